"""Non-finite losses (or non-finite gradients of a finite loss): the run stops before the
optimizer step with a message naming the iteration and the loss terms (or parameters), the last
good checkpoint stays as it was (and resumes), all processes stop together
(test_distributed.py); or a bounded number of bad iterations is skipped without update."""

import contextlib
import io
import os

import pytest
import torch


def _error(call) -> str:
    """Run ``call()``, train_net.py in this process, which must stop with one user error:
    ``train_net.py: error: ...`` on stderr and exit status 2 (dcnv2.errors); its message."""
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as excinfo, contextlib.redirect_stderr(stderr):
        call()
    message = stderr.getvalue()
    assert excinfo.value.code == 2, message
    assert message.startswith("train_net.py: error: ") and message.count("error:") == 1, message
    return message


def _stop_at_iteration_2(rel, train_net, reference_run, tmp_path, fault) -> str:
    """Run the tiny float64 config with ``fault`` at iteration 2; check it stopped before the
    update with the good checkpoint of iteration 1 (the uninterrupted run's) left as it was.
    Returns the error message."""
    message = _error(
        lambda: rel.run_in_process(train_net, rel.tiny_args(tmp_path), dict(rel.FLOAT64, **fault))
    )
    assert "weights were not updated" in message
    assert f"The last checkpoint, {tmp_path / 'model_0000001.pth'}, was written before" in message
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    good = rel.final_weights(tmp_path, "model_0000001.pth")
    rel.assert_same_weights(good, rel.final_weights(reference_run, "model_0000001.pth"))
    return message


def test_nan_stops_before_the_update_keeps_the_checkpoint_and_resumes(
    rel, train_net, tiny_dataset, reference_run, tmp_path
):
    fault = {"DCNV2_TEST_NAN_AT": "2"}
    message = _stop_at_iteration_2(rel, train_net, reference_run, tmp_path, fault)
    assert "Loss became non-finite at iteration 2: loss_box_reg=nan." in message
    assert "SOLVER.DCNV2.MAX_NONFINITE_SKIPS" in message
    # Nothing written after the good checkpoint.
    assert not [f for f in os.listdir(tmp_path) if f.startswith("model_") and "0001" not in f]
    assert "Traceback" not in (tmp_path / "log.txt").read_text()

    # Once the cause is gone, --resume continues from it to the uninterrupted run's weights.
    rel.run_in_process(train_net, rel.tiny_args(tmp_path, flags=["--resume"]), rel.FLOAT64)
    rel.assert_same_weights(
        rel.final_weights(tmp_path), rel.final_weights(reference_run), rtol=1e-12, atol=1e-15
    )


def test_bounded_skips_drop_the_update_then_stop(rel, train_net, tiny_dataset, tmp_path):
    opts = ["SOLVER.DCNV2.MAX_NONFINITE_SKIPS", "1", "SOLVER.CHECKPOINT_PERIOD", "1"]
    message = _error(
        lambda: rel.run_in_process(
            train_net, rel.tiny_args(tmp_path, *opts), {"DCNV2_TEST_NAN_AT": "1,2"}
        )
    )
    assert "non-finite at iteration 2: loss_box_reg=nan." in message
    assert "skipped before for the same reason: [1] (at most 1" in message
    log = (tmp_path / "log.txt").read_text()
    assert (
        "Non-finite loss at iteration 1: loss_box_reg=nan. Skipped this iteration's update" in log
    )
    # Iteration 1 changed nothing (no step: no momentum, no weight decay); iteration 0 did.
    w0, w1 = (rel.final_weights(tmp_path, f"model_000000{i}.pth") for i in (0, 1))
    rel.assert_same_weights(w1, w0)
    assert all(torch.isfinite(v).all() for v in w1.values())
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    state = torch.load(tmp_path / "model_0000001.pth", weights_only=True)["trainer"]
    assert state["_trainer"]["hooks"]["NonFiniteGuard"] == {"skipped": [1]}  # kept on resume


def test_real_divergence_stops_with_a_clear_message(rel, train_net, tiny_dataset, tmp_path):
    # No injected fault: a learning rate far too high blows the weights up after iteration 0;
    # detectron2's RPN then finds non-finite predictions in the forward pass of iteration 1.
    opts = ["SOLVER.BASE_LR", "1000.0", "SOLVER.WARMUP_ITERS", "0", "SOLVER.CHECKPOINT_PERIOD", "1"]
    message = _error(lambda: rel.run_in_process(train_net, rel.tiny_args(tmp_path, *opts)))
    assert "outputs became non-finite at iteration 1" in message
    assert "the weights diverged in an earlier update" in message
    assert "It may already hold diverged weights" in message
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"


def test_nonfinite_gradient_of_a_finite_loss_stops_before_the_update(
    rel, train_net, tiny_dataset, reference_run, tmp_path
):
    fault = {"DCNV2_TEST_NAN_GRAD_AT": "2"}
    message = _stop_at_iteration_2(rel, train_net, reference_run, tmp_path, fault)
    assert (
        "Gradients became non-finite at iteration 2 while the loss was finite, in 1 "
        f"parameter(s): {rel.faulty.NAN_GRAD_PARAMETER}." in message
    )


def test_nonfinite_gradients_can_be_skipped(rel, train_net, tiny_dataset, tmp_path):
    opts = ["SOLVER.DCNV2.MAX_NONFINITE_SKIPS", "1", "SOLVER.CHECKPOINT_PERIOD", "1"]
    rel.run_in_process(train_net, rel.tiny_args(tmp_path, *opts), {"DCNV2_TEST_NAN_GRAD_AT": "1"})
    log = (tmp_path / "log.txt").read_text()
    assert f"Non-finite gradients at iteration 1: {rel.faulty.NAN_GRAD_PARAMETER}." in log
    # Iteration 1 changed nothing; the run went on to the end with finite weights.
    w0, w1 = (rel.final_weights(tmp_path, f"model_000000{i}.pth") for i in (0, 1))
    rel.assert_same_weights(w1, w0)
    final = rel.final_weights(tmp_path)
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    assert rel.weights_moved(final, w1) > 0


def test_gradient_scan_names_parameters_and_leaves_grad_scalers_alone():
    from dcnv2.engine.hooks import NonFiniteGuard
    from dcnv2.engine.trainer import build_training_loop

    class Wrapped(torch.nn.Module):  # DDP-like: parameters named "module.<name>"
        def __init__(self):
            super().__init__()
            self.module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))

    model = Wrapped()
    loop = build_training_loop(model, [], torch.optim.SGD(model.parameters(), 0.1))
    (guard,) = loop._hooks
    assert isinstance(guard, NonFiniteGuard)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    assert guard._nonfinite_gradients() == {}
    model.module[1].weight.grad[0, 1] = float("inf")
    model.module[0].bias.grad[0] = float("nan")
    bad = guard._nonfinite_gradients()
    assert list(bad) == ["0.bias", "1.weight"] and bad["1.weight"] == float("inf")
    loop.grad_scaler = object()  # detectron2's AMPTrainer: inf gradients are the scaler's job
    assert guard._nonfinite_gradients() == {}
    assert build_training_loop(model, [], loop.optimizer, max_nonfinite_skips=None)._hooks == []
