"""build_training_loop: detectron2's SimpleTrainer (AutocastTrainer for amp off CUDA) over any
iterable of batches, with the non-finite guard as a hook: a non-finite loss stops before the
optimizer step, or is skipped without any update (no momentum, no weight decay)."""

import pytest
import torch
from detectron2.utils.events import EventStorage

from dcnv2.engine.amp import AutocastTrainer
from dcnv2.engine.hooks import NonFiniteGuard
from dcnv2.engine.trainer import build_training_loop
from dcnv2.errors import NonFiniteLossError


class Regression(torch.nn.Module):
    """A loss dict as detectron2's detectors return; NaN at the iterations in ``nan_at``."""

    def __init__(self, nan_at=()):
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)
        self.nan_at, self.calls = set(nan_at), 0

    def forward(self, batch):
        x, y = batch
        loss = (self.linear(x) - y).pow(2).mean()
        if self.calls in self.nan_at:
            loss = loss * float("nan")
        self.calls += 1
        return {"loss_a": loss, "loss_b": 0.5 * loss.detach() + 0 * loss}


def _data(n):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)) for _ in range(n)]


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def test_a_plain_list_of_batches_trains_without_hooks():
    model = Regression()
    loop = build_training_loop(model, _data(3), _sgd(model), max_nonfinite_skips=None)
    assert loop._hooks == []
    before = _weights(model)
    with EventStorage():
        loop.run_step()
    assert all(not torch.equal(a, b) for a, b in zip(before, _weights(model)))
    loop.train(0, 2)
    assert model.calls == 3


def test_amp_off_cuda_is_bfloat16_autocast():
    model = Regression()
    loop = build_training_loop(model, _data(2), _sgd(model), amp=True)
    assert type(loop) is AutocastTrainer and loop.precision == torch.bfloat16
    assert isinstance(loop._hooks[0], NonFiniteGuard)
    loop.train(0, 2)


def test_a_skipped_update_changes_nothing_then_the_limit_stops_the_run():
    data = _data(4)
    model = Regression(nan_at={1, 3})
    loop = build_training_loop(model, data, _sgd(model), max_nonfinite_skips=1)
    seen = []
    with EventStorage() as storage:
        loop.iter = 0
        loop.run_step()
        after_0 = _weights(model)
        loop.iter = 1
        loop.run_step()  # skipped: no update at all, and no NaN in the metrics
        assert all(torch.equal(a, b) for a, b in zip(after_0, _weights(model)))
        seen = storage.latest()
        assert all(v == v for v, _ in storage.history("total_loss").values())  # finite
        loop.iter = 2
        loop.run_step()
        assert not all(torch.equal(a, b) for a, b in zip(after_0, _weights(model)))
        loop.iter = 3
        with pytest.raises(NonFiniteLossError) as e:
            loop.run_step()
    assert "loss_a" not in seen or seen["loss_a"][1] != 1  # the NaN term left iteration 1's metrics
    assert str(e.value).startswith("Loss became non-finite at iteration 3: loss_a=nan")
    assert "Iterations skipped before for the same reason: [1]" in str(e.value)
    assert loop._hooks[0].state_dict() == {"skipped": [1]}


def test_with_a_grad_scaler_a_skipped_update_is_a_step_the_scaler_skips():
    # AMPTrainer (CUDA only) steps through its GradScaler, which refuses a step without any
    # gradient: the guard leaves it non-finite gradients, whose step the scaler skips.
    model = Regression()
    optimizer = _sgd(model)
    loop = build_training_loop(model, _data(1), optimizer, max_nonfinite_skips=1)
    loop.grad_scaler = scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    losses = model(_data(1)[0])
    scaler.scale(sum(losses.values())).backward()
    losses["loss_c"] = torch.tensor(float("nan"))  # a non-finite term without gradients
    before = _weights(model)
    loop._hooks[0].after_backward()
    assert set(losses) == {"loss_a", "loss_b"}  # the NaN term does not reach the metrics
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model)))
    assert scaler.get_scale() < 8.0 and loop._hooks[0].skipped == [0]
