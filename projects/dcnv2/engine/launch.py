"""The processes of a run: one line per user error from them (:func:`report_user_errors`); and
those started by ``torchrun`` or SLURM's ``srun``: their place in the job from the launcher's
variables, torch's ``env://`` rendezvous (``tools/slurm_train.sh`` exports ``MASTER_ADDR`` and
``MASTER_PORT`` for srun), then what detectron2's ``launch`` sets up."""

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
import torch.distributed as dist
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm

from ..config import cfg_get, run_keys
from ..errors import (
    USER_ERROR_EXIT,
    USER_ERRORS,
    LaunchError,
    NonFiniteLossError,
    TrainingInterrupted,
    report_user_error,
)
from .preflight import load_run_config

__all__ = ["ClusterProcess", "cluster_process", "report_user_errors", "resolve_launch"]
__all__ += ["run_in_cluster"]

TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
SLURM = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NNODES", "SLURM_NODEID")


@dataclass(frozen=True)
class ClusterProcess:
    """This process's place in the job (``launcher``: ``"torchrun"`` or ``"slurm"``)."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def num_machines(self) -> int:
        return self.world_size // self.local_world_size

    @property
    def machine_rank(self) -> int:
        return self.rank // self.local_world_size


def _read(environ: Mapping[str, str], names, launcher: str, hint: str):
    missing = [n for n in (*names, "MASTER_ADDR", "MASTER_PORT") if not environ.get(n)]
    if missing:
        raise LaunchError(f"{launcher}: {', '.join(missing)} not set; {hint}")
    bad = next((n for n in names if not environ[n].strip().isdigit()), None)
    if bad:
        raise LaunchError(f"{launcher}: {bad}={environ[bad]!r}; expected an integer")
    return [int(environ[n]) for n in names]


def cluster_process(environ: Optional[Mapping[str, str]] = None) -> Optional[ClusterProcess]:
    """This process in a torchrun job (first) or in an ``srun`` step of several tasks, else None
    (a batch script's own process has no ``SLURM_STEP_ID``)."""
    environ = os.environ if environ is None else environ
    if any(n in environ for n in TORCHRUN):
        hint = "a process started by torchrun has all of them (or unset them)"
        p = ClusterProcess("torchrun", *_read(environ, TORCHRUN, "torchrun", hint))
        node = p.machine_rank
    elif "SLURM_STEP_ID" in environ and environ.get("SLURM_NTASKS", "1") not in ("0", "1"):
        hint = "start the job with tools/slurm_train.sh, which exports them for srun"
        rank, world_size, local_rank, nodes, node = _read(environ, SLURM, "SLURM", hint)
        p = ClusterProcess("slurm", rank, world_size, local_rank, world_size // max(nodes, 1))
    else:
        return None
    # detectron2's per-machine groups need as many processes on every machine, ranked in order.
    fits = 0 <= p.rank < p.world_size and 0 <= p.local_rank < p.local_world_size
    if not fits or p.world_size % p.local_world_size or p.machine_rank != node:
        raise LaunchError(
            f"{p.launcher}: rank {p.rank} of {p.world_size} processes, local rank "
            f"{p.local_rank} of {p.local_world_size} per machine; expected ranks below their "
            "counts, as many processes on every machine (--ntasks-per-node), in rank order"
        )
    return p


def resolve_launch(args, environ: Optional[Mapping[str, str]] = None):
    """:func:`cluster_process`, with ``args.num_gpus``, ``num_machines``, ``machine_rank`` (None
    when not given) taken from the launcher, else 1, 1, 0. A mistake is raised by rank 0; the
    other ranks exit with ``USER_ERROR_EXIT`` after a wait, so the job prints one error line."""
    environ = os.environ if environ is None else environ
    try:
        p = cluster_process(environ)
        source = "LOCAL_WORLD_SIZE" if p and p.launcher == "torchrun" else "tasks per node"
        for option, actual, what in zip(
            ("--num-gpus", "--num-machines", "--machine-rank"),
            (p.local_world_size, p.num_machines, p.machine_rank) if p else (1, 1, 0),
            (source, "machines", "this machine's rank"),
        ):
            name = option[2:].replace("-", "_")
            given = getattr(args, name)
            if p is None or given is None or given == actual:
                setattr(args, name, actual if p or given is None else given)
                continue
            raise LaunchError(
                f"{option} {given} but {p.launcher} started {p.world_size} process(es), "
                f"{p.local_world_size} per machine ({what}: {actual}); leave {option} out "
                f"under {p.launcher}: it is taken from the launcher"
            )
    except LaunchError:
        if environ.get("RANK", environ.get("SLURM_PROCID", "0")) != "0":
            leave_report_to_main_process()
            raise SystemExit(USER_ERROR_EXIT) from None
        raise
    return p


def _check_together(check: Callable, args) -> None:
    """``check(args)`` on each machine's first process; the main process raises a failure."""
    error = None
    if comm.get_local_rank() == 0:
        try:
            check(args)
        except USER_ERRORS as e:
            error = e
    messages = comm.all_gather(None if error is None else str(error) or type(error).__name__)
    failed = [rank for rank, m in enumerate(messages) if m is not None]
    if failed and not comm.is_main_process():
        raise SystemExit(USER_ERROR_EXIT)
    if error is not None:
        raise error
    if failed:
        machine = failed[0] // comm.get_local_size()
        raise LaunchError(f"{messages[failed[0]]} (on machine {machine})")


def run_in_cluster(p: ClusterProcess, main_func: Callable, args, *, check: Callable):
    """Join the job's process group (NCCL for a CUDA config, else gloo) as detectron2's
    ``launch`` workers do, run ``check(args)`` once per machine, then ``main_func(args)``."""
    try:
        cfg = load_run_config(args.config_file, args.opts)
        on_gpu = torch.device(cfg_get(cfg, run_keys(cfg).device)).type == "cuda"
    except Exception:  # noqa: BLE001  (reported by the checks, on one process)
        on_gpu = torch.cuda.is_available()
    kwargs = dict(world_size=p.world_size, rank=p.rank, timeout=DEFAULT_TIMEOUT)
    dist.init_process_group("nccl" if on_gpu else "gloo", "env://", **kwargs)
    try:
        comm.create_local_process_group(p.local_world_size)
        if on_gpu:
            torch.cuda.set_device(p.local_rank)
        _check_together(check, args)
        return main_func(args)
    finally:
        dist.destroy_process_group()


def leave_report_to_main_process() -> None:
    """Wait before exiting on a user error that every process finds: the main process prints it
    meanwhile (an earlier exit could make the launcher stop it before it has printed)."""
    time.sleep(5.0)


def report_user_errors(prog: str, main_func: Callable, *args):
    """``main_func(*args)`` in a worker process of ``launch``: a user error is printed once, as
    ``<prog>: error: ...``, and the process exits with ``USER_ERROR_EXIT`` (the launcher then
    stops the others). With one process it propagates to the caller, the launching process."""
    try:
        return main_func(*args)
    except USER_ERRORS as e:
        if comm.get_world_size() == 1:
            raise
        if not comm.is_main_process():
            leave_report_to_main_process()
            # Raised by every process together (they agree on it): the main one reports it.
            if isinstance(e, TrainingInterrupted):
                sys.exit(e.exit_status)
            if isinstance(e, NonFiniteLossError) and not e.diverged:
                sys.exit(USER_ERROR_EXIT)
        sys.exit(report_user_error(prog, e))
