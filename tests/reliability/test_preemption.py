"""SIGTERM (a cluster preempting the job) stops a training run after the iteration in progress,
with an atomic checkpoint of that iteration, one line saying where it stopped and how to resume,
and exit status 143; every process stops at the same iteration; ``--resume`` then ends with the
weights of an uninterrupted run. A second SIGTERM while the checkpoint is written is ignored."""

import glob
import os
import shlex
import sys

import pytest
import torch

from dcnv2.engine.preemption import resume_command


def _assert_stopped_at(out_dir, proc, iteration):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 143, out[-3000:]
    assert "Traceback" not in out and "error:" not in out, out[-3000:]
    stopped = [line for line in proc.stderr.splitlines() if "train_net.py: stopped:" in line]
    assert len(stopped) == 1, out[-3000:]
    checkpoint = os.path.join(out_dir, f"model_{iteration:07d}.pth")
    assert f"Stopped by SIGTERM after iteration {iteration} of 4" in stopped[0]
    assert f"checkpoint {checkpoint} written" in stopped[0]
    command = shlex.split(stopped[0].split("Continue the run with: ")[1])
    assert command[0] == sys.executable and command[1].endswith("faulty_train_net.py")
    assert command[2] == "--resume" and str(out_dir) in command  # the same overrides
    with open(os.path.join(out_dir, "last_checkpoint")) as f:
        assert f.read() == os.path.basename(checkpoint)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["iteration"] == iteration
    assert not glob.glob(os.path.join(out_dir, ".*.tmp"))
    assert not os.path.exists(os.path.join(out_dir, "model_final.pth"))


def test_sigterm_stops_with_a_checkpoint_then_resume_equals_uninterrupted_run(
    rel, train_net, tiny_dataset, reference_run, tmp_path
):
    # SIGTERM in iteration 2's forward pass, and again while its checkpoint is written; no
    # periodic checkpoint, so the one on disk is the preemption's.
    env = dict(rel.FLOAT64, DCNV2_TEST_SIGNAL_AT="2", DCNV2_TEST_SIGNAL_IN_SAVE="1")
    proc = rel.run_faulty(
        rel.tiny_args(tmp_path, "SOLVER.CHECKPOINT_PERIOD", "100"), tiny_dataset, env
    )
    _assert_stopped_at(tmp_path, proc, 2)
    assert "Received SIGTERM again: ignored" in (tmp_path / "log.txt").read_text()

    rel.run_in_process(train_net, rel.tiny_args(tmp_path, flags=["--resume"]), rel.FLOAT64)
    assert "Starting training from iteration 3" in (tmp_path / "log.txt").read_text()
    reference = rel.final_weights(reference_run)
    stopped = rel.final_weights(tmp_path, "model_0000002.pth")
    assert rel.weights_moved(reference, stopped) > 1e-4  # iteration 3 changed the weights
    rel.assert_same_weights(rel.final_weights(tmp_path), reference, rtol=1e-12, atol=1e-15)


def test_sigterm_on_one_of_two_processes_stops_both_at_the_same_iteration(
    rel, train_net, tiny_dataset, reference_run, tmp_path
):
    # Only process 1 receives the signal, in iteration 2: both stop after iteration 2.
    env = dict(rel.FLOAT64, DCNV2_TEST_SIGNAL_AT="2@1")
    proc = rel.run_faulty(rel.tiny_args(tmp_path, flags=["--num-gpus", "2"]), tiny_dataset, env)
    _assert_stopped_at(tmp_path, proc, 2)
    for log in ("log.txt", "log.txt.rank1"):
        assert "Stopped by SIGTERM after iteration 2 of 4" in (tmp_path / log).read_text()

    rel.run_in_process(train_net, rel.tiny_args(tmp_path, flags=["--resume"]), rel.FLOAT64)
    reference = rel.final_weights(reference_run)
    rel.assert_same_weights(rel.final_weights(tmp_path), reference, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["train_net.py", "--config-file", "a b.yaml"],
            "train_net.py --resume --config-file 'a b.yaml'",
        ),
        (["/x/train_net.py", "--resume", "X", "1"], "/x/train_net.py --resume X 1"),
    ],
)
def test_resume_command_names_this_interpreter_script_and_overrides(argv, expected, monkeypatch):
    monkeypatch.setattr(sys, "executable", "/opt/env 1/bin/python3")
    assert resume_command(argv) == f"'/opt/env 1/bin/python3' {expected}"
    monkeypatch.setattr(sys, "argv", argv)
    assert resume_command() == f"'/opt/env 1/bin/python3' {expected}"


def test_sigterm_to_the_whole_process_group_with_loader_workers(rel, tiny_dataset, tmp_path):
    # SIGTERM to the process group (sent by another process in iteration 2 of process 0): the
    # launcher and both training processes receive it, the launcher forwards it once more; the
    # data-loader workers, in process groups of their own, do not (they are shut down after).
    env = dict(DCNV2_TEST_SIGNAL_AT="2@0", DCNV2_TEST_SIGNAL_GROUP="1")
    args = rel.tiny_args(tmp_path, "DATALOADER.NUM_WORKERS", "1", flags=["--num-gpus", "2"])
    proc = rel.run_faulty(args, tiny_dataset, env, new_session=True)
    assert "exited unexpectedly" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 143, proc.stderr[-3000:]
    # Every process stops after the same iteration (2, or 3 had a copy of the signal arrived
    # during it only): the checkpoint of that iteration is the last one.
    stops = {
        log: [line for line in (tmp_path / log).read_text().splitlines() if "Stopped by" in line]
        for log in ("log.txt", "log.txt.rank1")
    }
    assert all(len(lines) == 1 for lines in stops.values()), stops
    iteration = int(stops["log.txt"][0].split("after iteration ")[1].split(" ")[0])
    assert f"after iteration {iteration} of 4" in stops["log.txt.rank1"][0]
    _assert_stopped_at(tmp_path, proc, iteration)
