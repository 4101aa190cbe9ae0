"""PreemptionHook in a plain detectron2 SimpleTrainer (the LazyConfig loop's): a signal during an
iteration stops training after it, with that iteration's checkpoint and exit status 128+signal;
handlers are installed only from the main thread and restored afterwards; the launcher's
forwarding passes the signal on to its children."""

import multiprocessing
import os
import signal
import threading
import time

import pytest
import torch
from detectron2.checkpoint import Checkpointer
from detectron2.engine import SimpleTrainer

from dcnv2.engine.preemption import PreemptionHook, forward_stop_signals
from dcnv2.errors import DCNv2Error, TrainingInterrupted


class _Model(torch.nn.Module):
    def __init__(self, signal_at=None, signum=signal.SIGTERM):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)
        self.signal_at, self.signum, self.calls = signal_at, signum, 0

    def forward(self, batch):
        if self.calls == self.signal_at:
            os.kill(os.getpid(), self.signum)
        self.calls += 1
        return {"loss": self.linear(batch).pow(2).mean()}


def _loader():
    while True:
        yield torch.ones(4, 2)


def _train(tmp_path, model, max_iter=6):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = SimpleTrainer(model, _loader(), optimizer)
    checkpointer = Checkpointer(model, str(tmp_path), trainer=trainer)
    trainer.register_hooks([PreemptionHook(checkpointer)])
    trainer.train(0, max_iter)
    return trainer


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_after_the_iteration_with_its_checkpoint(tmp_path, signum):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    model = _Model(signal_at=2, signum=signum)
    with pytest.raises(TrainingInterrupted) as excinfo:
        _train(tmp_path, model)
    error = excinfo.value
    assert isinstance(error, DCNv2Error)
    assert error.exit_status == 128 + signum  # 143 for SIGTERM, 130 for SIGINT
    assert f"Stopped by {signal.Signals(signum).name} after iteration 2 of 6" in str(error)
    assert model.calls == 3  # iteration 2 finished, 3 never started
    state = torch.load(tmp_path / "model_0000002.pth", weights_only=True)
    assert state["iteration"] == 2
    torch.testing.assert_close(state["model"]["linear.weight"], model.linear.weight.detach())
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"
    assert {s: signal.getsignal(s) for s in before} == before


def test_without_a_signal_training_ends_normally_and_handlers_are_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    trainer = _train(tmp_path, _Model())
    assert trainer.iter == 6 and not os.listdir(tmp_path)
    assert signal.getsignal(signal.SIGTERM) is before


def test_no_handler_outside_the_main_thread(tmp_path):
    seen = []
    hook = PreemptionHook(checkpointer=None)

    def run():
        hook.before_train()
        seen.append(signal.getsignal(signal.SIGTERM))
        hook.after_train()

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [before]


def _wait_for_signal():
    time.sleep(60)


def test_launcher_forwards_sigterm_to_its_children():
    child = multiprocessing.get_context("spawn").Process(target=_wait_for_signal)
    before = signal.getsignal(signal.SIGTERM)
    with forward_stop_signals():
        child.start()
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher survives it...
        child.join(30)
    assert child.exitcode == -signal.SIGTERM  # ...and the child received it
    assert signal.getsignal(signal.SIGTERM) is before
