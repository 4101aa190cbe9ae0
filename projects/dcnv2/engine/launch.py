"""Processes started by a cluster launcher: ``torchrun`` (``torch.distributed.run``) or SLURM's
``srun``, one training process each, instead of the processes detectron2's ``launch`` spawns.

Each such process reads its place in the job from the environment the launcher set
(:func:`cluster_process`), joins the process group itself and sets up what detectron2's
``launch`` sets up in the processes it spawns (its ``_distributed_worker``: the process group,
``comm``'s per-machine group, the GPU), so detectron2's ``comm`` works as under ``launch``
(:func:`run_in_cluster`).
"""

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable, List, Mapping, Optional

import torch
import torch.distributed as dist
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm

from ..config import cfg_get, run_keys
from ..errors import USER_ERROR_EXIT, USER_ERRORS, LaunchError
from .preflight import leave_report_to_main_process, load_run_config

__all__ = [
    "ClusterProcess",
    "cluster_process",
    "parse_slurm_nodelist",
    "parse_slurm_tasks_per_node",
    "resolve_launch",
    "resolve_process_counts",
    "run_in_cluster",
    "slurm_process",
    "torchrun_process",
]

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
# A job's rendezvous port when MASTER_PORT is not set: SLURM_JOB_ID mapped into
# [SLURM_PORT_BASE, SLURM_PORT_BASE + SLURM_PORT_SPAN), below Linux's ephemeral ports (32768+),
# so that two jobs sharing a first node rarely collide.
SLURM_PORT_BASE = 12000
SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class ClusterProcess:
    """This process's place in a job a cluster launcher started.

    Attributes:
        launcher: ``"torchrun"`` or ``"slurm"``.
        rank: global rank, in [0, world_size).
        world_size: processes in the job.
        local_rank: rank on this machine, in [0, local_world_size).
        local_world_size: processes on each machine.
        init_method: ``torch.distributed`` rendezvous URL (``env://`` under torchrun).
    """

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    init_method: str

    @property
    def num_machines(self) -> int:
        return self.world_size // self.local_world_size

    @property
    def machine_rank(self) -> int:
        return self.rank // self.local_world_size


def _int(environ: Mapping[str, str], name: str, launcher: str) -> int:
    value = environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise LaunchError(
            f"{launcher}: environment variable {name}={value!r}; expected an integer"
        ) from None


def torchrun_process(environ: Mapping[str, str]) -> Optional[ClusterProcess]:
    """The process ``torchrun`` started, from the variables it sets (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), or None when this
    process was not started by torchrun (none of them set).

    Raises:
        LaunchError: some of them set but not all, or not integers.
    """
    names = (*TORCHRUN_VARIABLES, "MASTER_ADDR", "MASTER_PORT")
    present = [n for n in names if n in environ]
    if not present:
        return None
    missing = [n for n in names if n not in environ]
    if missing:
        raise LaunchError(
            f"the environment sets {', '.join(present)} but not {', '.join(missing)}; a process "
            "started by torchrun has all of them. Start train_net.py with torchrun (or unset them)"
        )
    rank, world_size, local_rank, local_world_size = (
        _int(environ, n, "torchrun") for n in TORCHRUN_VARIABLES
    )
    _check_ranks("torchrun", rank, world_size, local_rank, local_world_size)
    return ClusterProcess("torchrun", rank, world_size, local_rank, local_world_size, "env://")


def _check_ranks(launcher: str, rank: int, world_size: int, local_rank: int, local_size: int):
    if not (0 <= rank < world_size and 0 <= local_rank < local_size) or world_size % local_size:
        raise LaunchError(
            f"{launcher}: rank {rank} of {world_size} processes, local rank {local_rank} of "
            f"{local_size} per machine; expected ranks below their counts and the same number "
            "of processes on every machine (detectron2's per-machine groups need it)"
        )


def _split_top_level(text: str) -> List[str]:
    """``text`` split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_range(body: str) -> List[str]:
    values = []
    for item in body.split(","):
        low, sep, high = item.partition("-")
        if not sep:
            values.append(low)
            continue
        width = len(low)  # zero padding: node[08-11] -> node08 ... node11
        values.extend(f"{n:0{width}d}" for n in range(int(low), int(high) + 1))
    return values


def parse_slurm_nodelist(nodelist: str) -> List[str]:
    """The host names of a SLURM node list, in order, as ``scontrol show hostnames`` prints them
    for the usual forms: ``"a,b"``, ``"node[01-03,07]"``, ``"gpu[1-2]-ib"``,
    ``"rack[1-2]-n[1-2]"`` (every combination, the last bracket varying fastest).

    Raises:
        LaunchError: an empty list, unbalanced brackets or a range that is not numbers.
    """
    hosts = []
    for item in _split_top_level(nodelist.strip()):
        pieces = re.split(r"(\[[^\[\]]*\])", item)
        if any(c in p for p in pieces[::2] for c in "[]"):
            raise LaunchError(f"SLURM node list {nodelist!r}: unbalanced brackets in {item!r}")
        expanded = [""]
        for k, piece in enumerate(pieces):
            try:
                options = _expand_range(piece[1:-1]) if k % 2 else [piece]
            except ValueError:
                raise LaunchError(
                    f"SLURM node list {nodelist!r}: {piece!r} is not a list of numbers and "
                    "ranges such as [01-03,07]"
                ) from None
            expanded = [prefix + option for prefix in expanded for option in options]
        hosts.extend(expanded)
    if not hosts:
        raise LaunchError(f"SLURM node list {nodelist!r} names no host")
    return hosts


def parse_slurm_tasks_per_node(text: str) -> List[int]:
    """Tasks on each node from SLURM's compressed form: ``"2(x3),1"`` is ``[2, 2, 2, 1]``.

    Raises:
        LaunchError: not of that form.
    """
    counts = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if match is None:
            raise LaunchError(f"SLURM tasks per node {text!r}; expected a form such as 2(x3),1")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def _first_host(nodelist: str, search_path: Optional[str]) -> str:
    scontrol = shutil.which("scontrol", path=search_path)
    if scontrol is not None:
        try:
            out = subprocess.run(
                [scontrol, "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout.split()
        except (OSError, subprocess.SubprocessError):
            out = []
        if out:
            return out[0]
    return parse_slurm_nodelist(nodelist)[0]


def _first(environ: Mapping[str, str], *names: str) -> Optional[str]:
    return next((environ[n] for n in names if environ.get(n)), None)


def slurm_process(environ: Mapping[str, str]) -> Optional[ClusterProcess]:
    """The task ``srun`` started, from ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NODEID``, the
    step's task count and tasks per node (``SLURM_STEP_NUM_TASKS`` / ``SLURM_NTASKS``,
    ``SLURM_STEP_TASKS_PER_NODE`` / ``SLURM_NTASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE``); the
    rendezvous is on the node list's first host (``SLURM_STEP_NODELIST`` /
    ``SLURM_JOB_NODELIST``) at a port derived from ``SLURM_JOB_ID`` (``MASTER_ADDR`` and
    ``MASTER_PORT`` win when set).

    Returns:
        None outside an ``srun`` step (no ``SLURM_STEP_ID``: a batch script itself runs as one
        process, which spawns its own) or in a step of one task.

    Raises:
        LaunchError: variables missing or malformed, or a different number of tasks per node.
    """
    if "SLURM_PROCID" not in environ or _first(environ, "SLURM_STEP_ID", "SLURM_STEPID") is None:
        return None
    tasks = _first(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    if tasks is None or _int({"n": tasks}, "n", "SLURM") <= 1:
        return None
    world_size = int(tasks)
    rank = _int(environ, "SLURM_PROCID", "SLURM")
    local_rank = _int(environ, "SLURM_LOCALID", "SLURM")
    per_node = _first(
        environ, "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"
    )
    if per_node is None:
        raise LaunchError(
            "SLURM: none of SLURM_STEP_TASKS_PER_NODE, SLURM_NTASKS_PER_NODE, "
            "SLURM_TASKS_PER_NODE is set; run train_net.py with srun"
        )
    counts = parse_slurm_tasks_per_node(per_node)
    if len(set(counts)) > 1:
        raise LaunchError(
            f"SLURM: {per_node} tasks per node; expected the same number on every node "
            "(sbatch/srun --ntasks-per-node)"
        )
    local_world_size = counts[0]
    _check_ranks("SLURM", rank, world_size, local_rank, local_world_size)
    address = environ.get("MASTER_ADDR")
    if not address:
        nodelist = _first(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        if nodelist is None:
            raise LaunchError("SLURM: no SLURM_JOB_NODELIST to take the rendezvous host from")
        address = _first_host(nodelist, environ.get("PATH"))
    if environ.get("MASTER_PORT"):
        port = _int(environ, "MASTER_PORT", "SLURM")
    else:
        job = _int(environ, "SLURM_JOB_ID", "SLURM") if "SLURM_JOB_ID" in environ else 0
        port = SLURM_PORT_BASE + job % SLURM_PORT_SPAN
    host = f"[{address}]" if ":" in address else address  # an IPv6 address
    url = f"tcp://{host}:{port}"
    return ClusterProcess("slurm", rank, world_size, local_rank, local_world_size, url)


def cluster_process(environ: Optional[Mapping[str, str]] = None) -> Optional[ClusterProcess]:
    """This process's place in a torchrun job (first) or an ``srun`` step of several tasks, or
    None when neither started it (then ``train_net.py`` spawns its processes itself).

    Args:
        environ: the environment (``os.environ`` when None).
    """
    environ = os.environ if environ is None else environ
    return torchrun_process(environ) or slurm_process(environ)


def resolve_process_counts(args, cluster: Optional[ClusterProcess]) -> None:
    """Fill ``args.num_gpus``, ``args.num_machines`` and ``args.machine_rank`` (None when not
    given on the command line): from ``cluster`` when a launcher started this process, else
    the defaults (1, 1, 0).

    Raises:
        LaunchError: a value given on the command line contradicts the launcher's.
    """
    if cluster is None:
        args.num_gpus = 1 if args.num_gpus is None else args.num_gpus
        args.num_machines = 1 if args.num_machines is None else args.num_machines
        args.machine_rank = 0 if args.machine_rank is None else args.machine_rank
        return
    variable = "LOCAL_WORLD_SIZE" if cluster.launcher == "torchrun" else "tasks per node"
    for option, given, actual, source in (
        ("--num-gpus", args.num_gpus, cluster.local_world_size, variable),
        ("--num-machines", args.num_machines, cluster.num_machines, "machines"),
        ("--machine-rank", args.machine_rank, cluster.machine_rank, "this machine's rank"),
    ):
        if given is not None and given != actual:
            raise LaunchError(
                f"{option} {given} but {cluster.launcher} started {cluster.world_size} "
                f"process(es), {cluster.local_world_size} per machine ({source}: {actual}); "
                f"leave {option} out under {cluster.launcher}: it is taken from the launcher"
            )
    args.num_gpus = cluster.local_world_size
    args.num_machines = cluster.num_machines
    args.machine_rank = cluster.machine_rank


def resolve_launch(args, environ: Optional[Mapping[str, str]] = None):
    """:func:`cluster_process` and :func:`resolve_process_counts` for ``train_net.py``'s
    command line. Every process of a cluster job finds the same mistakes here, before they can
    talk to each other: only the first one (rank 0) raises, the others exit with
    ``USER_ERROR_EXIT`` without a word after :func:`.preflight.leave_report_to_main_process`'s
    wait, so that the job prints one error line (exiting at once, they could make the launcher
    stop rank 0 before it printed it).

    Returns:
        Optional[ClusterProcess]: this process, or None outside a cluster launcher.
    """
    environ = os.environ if environ is None else environ
    try:
        cluster = cluster_process(environ)
        resolve_process_counts(args, cluster)
    except LaunchError:
        if _first(environ, "RANK", "SLURM_PROCID") not in (None, "0"):
            leave_report_to_main_process()
            raise SystemExit(USER_ERROR_EXIT) from None
        raise
    return cluster


def _join(cluster: ClusterProcess, device: str, timeout) -> None:
    """What detectron2's ``launch`` does in each process it spawns, for this process."""
    on_gpu = torch.device(device).type == "cuda"
    dist.init_process_group(
        backend="nccl" if on_gpu else "gloo",
        init_method=cluster.init_method,
        world_size=cluster.world_size,
        rank=cluster.rank,
        timeout=timeout,
    )
    comm.create_local_process_group(cluster.local_world_size)
    if on_gpu:
        torch.cuda.set_device(cluster.local_rank)
    comm.synchronize()


def _check_together(check: Callable, args) -> None:
    """``check(args)`` on the first process of each machine (the checks read that machine's
    files, and make the synthetic datasets once); every process learns whether it failed.
    The main process raises the first failure; the others exit with ``USER_ERROR_EXIT``
    without a word, so that the job prints one error line."""
    error = None
    if comm.get_local_rank() == 0:
        try:
            check(args)
        except USER_ERRORS as e:
            error = e
    message = None if error is None else str(error) or type(error).__name__
    failures = [(rank, m) for rank, m in enumerate(comm.all_gather(message)) if m is not None]
    if not failures:
        return
    if not comm.is_main_process():
        raise SystemExit(USER_ERROR_EXIT)
    if error is not None:
        raise error
    rank, message = failures[0]
    raise LaunchError(f"{message} (on machine {rank // comm.get_local_size()})")


def _run_device(args) -> str:
    """The device the run's config names; when it cannot be read (the checks will say why),
    CUDA if there is a GPU, as detectron2's ``launch`` assumes."""
    try:
        cfg = load_run_config(args.config_file, args.opts)
        keys = run_keys(cfg)
        return str(cfg_get(cfg, keys.device))
    except Exception:  # noqa: BLE001  (reported by the checks, on one process)
        return "cuda" if torch.cuda.is_available() else "cpu"


def run_in_cluster(cluster: ClusterProcess, main_func: Callable, args, *, check: Callable):
    """Run ``main_func(args)`` in this process of a cluster job: join the process group
    (NCCL when the config's device is CUDA, else gloo), run ``check(args)`` (the launching process's
    checks, :func:`dcnv2.engine.preflight.check_before_launch`) once per machine, then
    ``main_func``; the process group is destroyed on the way out.

    Args:
        cluster: this process (:func:`cluster_process`).
        main_func: one process's work.
        args: the parsed command line (:func:`resolve_process_counts` applied).
        check: raises a user error (:data:`dcnv2.errors.USER_ERRORS`) on bad input.
    """
    _join(cluster, _run_device(args), DEFAULT_TIMEOUT)
    try:
        _check_together(check, args)
        return main_func(args)
    finally:
        dist.destroy_process_group()
