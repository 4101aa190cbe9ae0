"""Processes started by torchrun or srun: their place in the job read from the environment, the
--num-gpus rule, and SLURM's node-list and tasks-per-node forms."""

import argparse

import pytest

from dcnv2.engine import launch
from dcnv2.engine.launch import (
    SLURM_PORT_BASE,
    ClusterProcess,
    cluster_process,
    parse_slurm_nodelist,
    parse_slurm_tasks_per_node,
    resolve_launch,
    resolve_process_counts,
    slurm_process,
    torchrun_process,
)
from dcnv2.errors import DCNv2Error, LaunchError

TORCHRUN = {
    "RANK": "5",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "4",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29500",
}
# What srun sets in the third task of a 2-node x 2-task step.
SRUN = {
    "SLURM_JOB_ID": "123456",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "2",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "4",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "PATH": "/nonexistent",  # no scontrol: the node list is parsed here
}


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("a,b", ["a", "b"]),
        ("single", ["single"]),
        ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("x[1-2],y,z[5]", ["x1", "x2", "y", "z5"]),
        ("gpu[1-2]-ib", ["gpu1-ib", "gpu2-ib"]),
        ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
    ],
)
def test_nodelist_forms(nodelist, hosts):
    assert parse_slurm_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[01-03", "node]1[", "node[a-c]", ""])
def test_malformed_nodelists_are_launch_errors(nodelist):
    with pytest.raises(LaunchError, match="SLURM node list"):
        parse_slurm_nodelist(nodelist)


def test_tasks_per_node_forms():
    assert parse_slurm_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_slurm_tasks_per_node("8") == [8]
    assert parse_slurm_tasks_per_node("4(x2)") == [4, 4]
    with pytest.raises(LaunchError, match="2x3"):
        parse_slurm_tasks_per_node("2x3")


def test_torchrun_environment():
    p = torchrun_process(TORCHRUN)
    assert p == ClusterProcess("torchrun", 5, 8, 1, 4, "env://")
    assert (p.num_machines, p.machine_rank) == (2, 1)
    assert torchrun_process({"PATH": "/bin"}) is None
    partial = {k: v for k, v in TORCHRUN.items() if k != "LOCAL_WORLD_SIZE"}
    with pytest.raises(LaunchError, match="not LOCAL_WORLD_SIZE"):
        torchrun_process(partial)
    with pytest.raises(LaunchError, match="RANK='x'"):
        torchrun_process(dict(TORCHRUN, RANK="x"))
    with pytest.raises(LaunchError, match="same number of processes on every machine"):
        torchrun_process(dict(TORCHRUN, WORLD_SIZE="6"))


def test_srun_environment():
    p = slurm_process(SRUN)
    port = SLURM_PORT_BASE + 123456 % 20000
    assert p == ClusterProcess("slurm", 2, 4, 0, 2, f"tcp://gpu07:{port}")
    assert (p.num_machines, p.machine_rank) == (2, 1)
    # MASTER_ADDR / MASTER_PORT win; SLURM_NTASKS_PER_NODE when the step's count is absent.
    env = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_TASKS_PER_NODE"}
    env.update(MASTER_ADDR="fe80::1", MASTER_PORT="4000", SLURM_NTASKS_PER_NODE="2")
    assert slurm_process(env).init_method == "tcp://[fe80::1]:4000"


def test_srun_first_host_comes_from_scontrol_when_there_is_one(tmp_path):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$2" = hostnames ] && echo "head-$3" && echo other\n')
    scontrol.chmod(0o755)
    p = slurm_process(dict(SRUN, PATH=str(tmp_path)))
    assert p.init_method.startswith("tcp://head-gpu[07-08]:")


def test_not_an_srun_step_of_several_tasks():
    # A batch script's own process has SLURM_PROCID but no step; a one-task step spawns.
    batch = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}
    assert slurm_process(batch) is None
    assert slurm_process(dict(SRUN, SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0")) is None
    assert cluster_process({"HOME": "/root"}) is None
    # Under torchrun inside an srun step, torchrun's variables win.
    assert cluster_process(dict(SRUN, **TORCHRUN)).launcher == "torchrun"


def test_srun_needs_the_same_tasks_on_every_node():
    with pytest.raises(LaunchError, match="2,1 tasks per node"):
        slurm_process(dict(SRUN, SLURM_STEP_TASKS_PER_NODE="2,1", SLURM_STEP_NUM_TASKS="3"))


def _args(**given):
    values = dict(num_gpus=None, num_machines=None, machine_rank=None)
    values.update(given)
    return argparse.Namespace(**values)


def test_process_counts_come_from_the_launcher():
    args = _args()
    resolve_process_counts(args, torchrun_process(TORCHRUN))
    assert (args.num_gpus, args.num_machines, args.machine_rank) == (4, 2, 1)
    args = _args(num_gpus=4, num_machines=2)  # agreeing values are accepted
    resolve_process_counts(args, torchrun_process(TORCHRUN))
    assert (args.num_gpus, args.num_machines, args.machine_rank) == (4, 2, 1)
    args = _args()
    resolve_process_counts(args, None)
    assert (args.num_gpus, args.num_machines, args.machine_rank) == (1, 1, 0)
    args = _args(num_gpus=2)
    resolve_process_counts(args, None)
    assert args.num_gpus == 2


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
        resolve_launch(_args(machine_rank=1), dict(SRUN, SLURM_PROCID="0"))
