"""A clean stop on SIGTERM or SIGINT (how SLURM, Kubernetes and Ctrl-C end a job):
:class:`PreemptionHook` finishes the iteration in progress on every process, writes its checkpoint
and raises :class:`~dcnv2.errors.TrainingInterrupted` (exit status 128 + signal) naming the command
that resumes the run; :func:`forward_stop_signals` passes the signals from a launching process on
to its workers."""

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

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def resume_command(argv: Optional[List[str]] = None) -> str:
    """The shell-quoted command line that continues this run: this interpreter, then ``argv``
    (default ``sys.argv``) with ``--resume`` after the script."""
    argv = list(sys.argv if argv is None else argv)
    if "--resume" not in argv:
        argv.insert(1, "--resume")
    return shlex.join([sys.executable or "python", *argv])


def _install(handler) -> Optional[Dict[int, object]]:
    """``handler`` for :data:`STOP_SIGNALS`; returns the previous handlers, or None (and
    installs nothing) outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return {s: signal.signal(s, handler) for s in STOP_SIGNALS}


def _restore(previous: Optional[Dict[int, object]]) -> None:
    for s, h in (previous or {}).items():
        signal.signal(s, h)


class PreemptionHook(HookBase):
    """Stop training after the iteration in progress when SIGTERM or SIGINT arrives, with a
    checkpoint of that iteration (named as detectron2's ``PeriodicCheckpointer`` names them).

    Register it after the hooks whose ``after_step`` belongs to the iteration (LR scheduler,
    periodic checkpointer, writers), so that ``--resume`` continues exactly.
    """

    def __init__(self, checkpointer):
        self.checkpointer = checkpointer
        self.signal: Optional[int] = None
        self._previous = None

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
        self._previous = _install(self._on_signal)
        if self._previous is None:
            logger.warning("Not the main thread: SIGTERM/SIGINT end training without a checkpoint.")

    def after_train(self):
        _restore(self._previous)
        self._previous = None

    def after_step(self):
        it = self.trainer.iter
        if it + 1 >= self.trainer.max_iter:
            return  # the last iteration: the run ends normally, with its final checkpoint
        device = next(self.trainer.model.parameters()).device
        if not _any_process(self.signal is not None, device):
            return
        signum = next((s for s in comm.all_gather(self.signal) if s is not None), signal.SIGTERM)
        name = f"model_{it:07d}"
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
    """In a launching process, send SIGTERM/SIGINT on to the processes ``multiprocessing``
    started (detectron2's ``launch`` workers) instead of dying, so they stop cleanly
    (:class:`PreemptionHook`) and the launcher reports how they ended."""

    def forward(signum, frame):
        for child in multiprocessing.active_children():
            with contextlib.suppress(OSError):
                os.kill(child.pid, signum)

    previous = _install(forward)
    try:
        yield
    finally:
        _restore(previous)
