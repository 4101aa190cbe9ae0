"""Processes started by torchrun or srun: their place in the job read from the launcher's
variables (MASTER_ADDR/MASTER_PORT for torch's env:// rendezvous), and the --num-gpus rule."""

import argparse

import pytest

from dcnv2.engine import launch
from dcnv2.engine.launch import ClusterProcess, cluster_process, resolve_launch
from dcnv2.errors import DCNv2Error, LaunchError

TORCHRUN = {
    "RANK": "5",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "4",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29500",
}
# What srun sets in the third task of a 2-node x 2-task step, with tools/slurm_train.sh's
# MASTER_ADDR/MASTER_PORT.
SRUN = {
    "SLURM_JOB_ID": "123456",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "2",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "1",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS": "4",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "MASTER_ADDR": "gpu07",
    "MASTER_PORT": "13456",
}


def test_torchrun_environment():
    p = cluster_process(TORCHRUN)
    assert p == ClusterProcess("torchrun", 5, 8, 1, 4)
    assert (p.num_machines, p.machine_rank) == (2, 1)
    assert cluster_process({"PATH": "/bin"}) is None
    partial = {k: v for k, v in TORCHRUN.items() if k != "LOCAL_WORLD_SIZE"}
    with pytest.raises(LaunchError, match="torchrun: LOCAL_WORLD_SIZE not set"):
        cluster_process(partial)
    with pytest.raises(LaunchError, match="RANK='x'; expected an integer"):
        cluster_process(dict(TORCHRUN, RANK="x"))
    with pytest.raises(LaunchError, match="as many processes on every machine"):
        cluster_process(dict(TORCHRUN, WORLD_SIZE="6"))


def test_srun_environment():
    p = cluster_process(SRUN)
    assert p == ClusterProcess("slurm", 2, 4, 0, 2)
    assert (p.num_machines, p.machine_rank) == (2, 1)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        env = {k: v for k, v in SRUN.items() if k != name}
        with pytest.raises(LaunchError, match=f"SLURM: {name} not set; .*slurm_train.sh"):
            cluster_process(env)
    with pytest.raises(LaunchError, match="as many processes on every machine"):
        cluster_process(dict(SRUN, SLURM_NTASKS="3", SLURM_PROCID="1", SLURM_NODEID="0"))
    with pytest.raises(LaunchError, match="in rank order"):  # srun --distribution=cyclic
        cluster_process(dict(SRUN, SLURM_NODEID="0"))


def test_not_an_srun_step_of_several_tasks():
    # A batch script's own process has SLURM_PROCID but no step; a one-task step spawns.
    batch = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}
    assert cluster_process(batch) is None
    assert cluster_process(dict(SRUN, SLURM_NTASKS="1", SLURM_PROCID="0")) is None
    assert cluster_process({"HOME": "/root"}) is None
    # Under torchrun inside an srun step, torchrun's variables win.
    assert cluster_process(dict(SRUN, **TORCHRUN)).launcher == "torchrun"


def _args(**given):
    values = dict(num_gpus=None, num_machines=None, machine_rank=None)
    values.update(given)
    return argparse.Namespace(**values)


def test_process_counts_come_from_the_launcher():
    args = _args()
    assert resolve_launch(args, TORCHRUN) == cluster_process(TORCHRUN)
    assert (args.num_gpus, args.num_machines, args.machine_rank) == (4, 2, 1)
    args = _args(num_gpus=4, num_machines=2)  # agreeing values are accepted
    resolve_launch(args, TORCHRUN)
    assert (args.num_gpus, args.num_machines, args.machine_rank) == (4, 2, 1)
    args = _args()
    assert resolve_launch(args, {}) is None
    assert (args.num_gpus, args.num_machines, args.machine_rank) == (1, 1, 0)
    args = _args(num_gpus=2, machine_rank=1)
    resolve_launch(args, {})
    assert (args.num_gpus, args.num_machines, args.machine_rank) == (2, 1, 1)


def test_a_contradicting_num_gpus_is_one_error_on_the_first_process_only(monkeypatch):
    waits = []
    monkeypatch.setattr(launch, "leave_report_to_main_process", lambda: waits.append(1))
    env = dict(TORCHRUN, RANK="0", LOCAL_RANK="0")
    with pytest.raises(LaunchError) as e:
        resolve_launch(_args(num_gpus=2), env)
    assert isinstance(e.value, DCNv2Error)
    assert str(e.value) == (
        "--num-gpus 2 but torchrun started 8 process(es), 4 per machine (LOCAL_WORLD_SIZE: 4); "
        "leave --num-gpus out under torchrun: it is taken from the launcher"
    )
    with pytest.raises(SystemExit) as quiet:
        resolve_launch(_args(num_gpus=2), TORCHRUN)  # rank 5 leaves the report to rank 0
    assert quiet.value.code == 2 and waits == [1]  # after rank 0 has had time to print
    with pytest.raises(LaunchError, match="--machine-rank 1 but slurm"):
        resolve_launch(_args(machine_rank=1), dict(SRUN, SLURM_PROCID="0", SLURM_NODEID="0"))
