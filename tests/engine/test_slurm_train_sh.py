"""tools/slurm_train.sh builds the srun (or sbatch) command of a SLURM job: one train_net.py task
per GPU, without --num-gpus (the tasks read it from SLURM), each exporting MASTER_ADDR (the
allocation's first node, from scontrol) and MASTER_PORT. srun/sbatch/scontrol are stand-ins."""

import os
import shlex
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "tools", "slurm_train.sh")


def _run(tmp_path, *args, **env):
    for name in ("srun", "sbatch"):
        fake = tmp_path / name
        fake.write_text(f'#!/bin/sh\necho {name}\nfor a in "$@"; do echo "$a"; done\n')
        fake.chmod(0o755)
    full_env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", **env)
    return subprocess.run(
        ["bash", SCRIPT, *args], env=full_env, capture_output=True, text=True, timeout=60
    )


def test_srun_command(tmp_path):
    proc = _run(tmp_path, "gpu", "r50", "cfg.yaml", "--resume", "OUTPUT_DIR", "out", GPUS="16")
    assert proc.returncode == 0, proc.stderr
    argv = proc.stdout.splitlines()
    assert argv[0] == "srun"
    for option in ["--partition=gpu", "--job-name=r50", "--ntasks=16", "--ntasks-per-node=8",
                   "--gres=gpu:8", "--cpus-per-task=5", "--kill-on-bad-exit=1"]:  # fmt: skip
        assert option in argv
    tail = argv[argv.index("-u") - 1 :]
    assert tail == ["python", "-u", os.path.join(REPO, "train_net.py"), "--config-file",
                    "cfg.yaml", "--resume", "OUTPUT_DIR", "out"]  # fmt: skip
    assert "--num-gpus" not in argv


def test_each_task_exports_the_rendezvous(tmp_path):
    argv = _run(tmp_path, "gpu", "r50", "cfg.yaml").stdout.splitlines()
    wrapper = argv[argv.index("bash") : argv.index("-u") - 1]  # bash -c SCRIPT NAME
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$2" = hostnames ] && echo "head-$3" && echo other\n')
    scontrol.chmod(0o755)
    show = ["sh", "-c", 'echo "$MASTER_ADDR:$MASTER_PORT"']
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_JOB_ID="123456")
    env["SLURM_JOB_NODELIST"] = "gpu[07-08]"
    run = subprocess.run([*wrapper, *show], env=env, capture_output=True, text=True, timeout=60)
    assert run.stdout == "head-gpu[07-08]:13456\n", run.stderr
    env["MASTER_PORT"] = "4000"  # the user's port wins
    run = subprocess.run([*wrapper, *show], env=env, capture_output=True, text=True, timeout=60)
    assert run.stdout == "head-gpu[07-08]:4000\n", run.stderr


def test_sbatch_submits_the_srun_command(tmp_path):
    proc = _run(tmp_path, "p", "job", "cfg.yaml", "A B", GPUS="4", SBATCH="1", CPUS_PER_TASK="2")
    assert proc.returncode == 0, proc.stderr
    argv = proc.stdout.splitlines()
    assert argv[0] == "sbatch" and "--nodes=1" in argv and "--output=job-%j.log" in argv
    wrapped = shlex.split(next(a for a in argv if a.startswith("--wrap="))[len("--wrap=") :])
    assert wrapped[0] == "srun" and "--ntasks=4" in wrapped and "--cpus-per-task=2" in wrapped
    assert wrapped[-2:] == ["cfg.yaml", "A B"]  # an argument with a space stays one
    assert "scontrol show hostnames" in wrapped[wrapped.index("-c") + 1]


def test_gpus_not_a_multiple_of_gpus_per_node_is_an_error(tmp_path):
    proc = _run(tmp_path, "p", "job", "cfg.yaml", GPUS="12", GPUS_PER_NODE="8")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (
        "slurm_train.sh: error: GPUS=12 is not a multiple of GPUS_PER_NODE=8"
    )
    usage = _run(tmp_path, "p")
    assert usage.returncode == 2 and "PARTITION JOB_NAME CONFIG" in usage.stderr
