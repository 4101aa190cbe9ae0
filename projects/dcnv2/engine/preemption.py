"""Stopping a training run cleanly on SIGTERM or SIGINT (how SLURM, Kubernetes and Ctrl-C end a
job): :class:`PreemptionHook` finishes the iteration in progress on every process, writes its
checkpoint and ends the run with :class:`~dcnv2.errors.TrainingInterrupted` (exit status 128 +
signal) naming the command that resumes it; :func:`forward_stop_signals` passes the signals from
a launching process on to its workers."""

import contextlib
import logging
import multiprocessing
import os
import shlex
import signal
import sys
import threading
from typing import Dict, Iterator, List, Optional

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..errors import TrainingInterrupted
from .hooks import _any_process

__all__ = ["STOP_SIGNALS", "PreemptionHook", "forward_stop_signals", "resume_command"]

logger = logging.getLogger(__name__)

# The signals that stop a run cleanly.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def resume_command(argv: Optional[List[str]] = None) -> str:
    """The command line that continues this run, shell-quoted: this interpreter
    (``sys.executable``), then ``argv`` (default ``sys.argv``: the same script, options and
    overrides) with ``--resume`` after the script."""
    argv = list(sys.argv if argv is None else argv)
    if "--resume" not in argv:
        argv.insert(1, "--resume")
    return shlex.join([sys.executable or "python", *argv])


@contextlib.contextmanager
def _handlers(handler) -> Iterator[bool]:
    """``handler`` for :data:`STOP_SIGNALS` inside the block, the previous handlers restored
    after; yields False (and installs nothing) outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous: Dict[int, object] = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield True
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class PreemptionHook(HookBase):
    """Stop training after the iteration in progress when SIGTERM or SIGINT arrives, with a
    checkpoint of that iteration.

    Put it after the hooks whose ``after_step`` belongs to the iteration (LR scheduler,
    periodic checkpointer, writers): the checkpoint then holds what a periodic checkpoint of
    that iteration holds, and ``--resume`` continues exactly.

    Args:
        checkpointer: the run's checkpointer (writes on the main process only, atomically).
        file_prefix: checkpoint names are ``f"{file_prefix}_{iteration:07d}"``, as detectron2's
            ``PeriodicCheckpointer``'s.
    """

    def __init__(self, checkpointer, file_prefix: str = "model"):
        self.checkpointer = checkpointer
        self.file_prefix = file_prefix
        self.signal: Optional[int] = None
        self._stack: Optional[contextlib.ExitStack] = None

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal = signum
            logger.warning(
                f"Received {name}: stopping after the iteration in progress, with a checkpoint."
            )
        else:
            logger.warning(f"Received {name} again: ignored, the run is already stopping.")

    def before_train(self):
        self.signal = None
        self._stack = contextlib.ExitStack()
        if not self._stack.enter_context(_handlers(self._on_signal)):
            logger.warning(
                "Training runs outside the main thread: SIGTERM/SIGINT stop it without a "
                "checkpoint."
            )

    def after_train(self):
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def after_step(self):
        it = self.trainer.iter
        if it + 1 >= self.trainer.max_iter:
            return  # the last iteration: the run ends normally, with its final checkpoint
        device = next(self.trainer.model.parameters()).device
        if not _any_process(self.signal is not None, device):
            return
        signum = comm.all_gather(self.signal)
        signum = next((s for s in signum if s is not None), signal.SIGTERM)
        name = f"{self.file_prefix}_{it:07d}"
        path = os.path.join(self.checkpointer.save_dir, f"{name}.pth")
        if self.checkpointer.get_checkpoint_file() != path:
            # A signal now is handled by _on_signal (logged, ignored): the write completes.
            self.checkpointer.save(name, iteration=it)
        comm.synchronize()
        message = (
            f"Stopped by {signal.Signals(signum).name} after iteration {it} of "
            f"{self.trainer.max_iter} (0-based); checkpoint {path} written. Continue the run "
            f"with: {resume_command()}"
        )
        logger.warning(message)
        raise TrainingInterrupted(message, signum=int(signum))


@contextlib.contextmanager
def forward_stop_signals() -> Iterator[None]:
    """In a launching process, send SIGTERM/SIGINT on to its child processes (those
    ``multiprocessing`` started: detectron2's ``launch`` workers) instead of dying, so they
    stop cleanly (:class:`PreemptionHook`) and the launcher reports how they ended."""

    def forward(signum, frame):
        for child in multiprocessing.active_children():
            with contextlib.suppress(OSError):
                os.kill(child.pid, signum)

    with _handlers(forward):
        yield
