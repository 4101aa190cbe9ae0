"""train_net.py started by torchrun (2 CPU processes, gloo): each process joins the run itself,
and the run computes what detectron2's launch with --num-gpus 2 computes."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_NET = os.path.join(REPO, "train_net.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
TORCHRUN += [TRAIN_NET]


def _run(command, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # torchrun gives each process one thread; so must launch's, for the same arithmetic.
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        command,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, proc.stdout + proc.stderr


def test_torchrun_two_processes_give_the_weights_of_launch_with_two(rel, tiny_dataset, tmp_path):
    json_file, image_root = tiny_dataset
    # Registered by the config in every process (nothing else registers it there).
    coco = ["DATASETS.DCNV2.COCO", repr(((rel.DATASET, json_file, image_root),))]
    launched = [sys.executable, TRAIN_NET]

    proc, out = _run([*TORCHRUN, *rel.tiny_args(tmp_path / "torchrun", *coco)])
    assert proc.returncode == 0, out[-4000:]
    log = (tmp_path / "torchrun" / "log.txt").read_text()
    assert "World size: 2" in log  # one run of 2 processes, not 2 runs of 1
    assert (tmp_path / "torchrun" / "log.txt.rank1").exists()

    flags = ["--num-gpus", "2"]
    proc, out = _run([*launched, *rel.tiny_args(tmp_path / "launch", *coco, flags=flags)])
    assert proc.returncode == 0, out[-4000:]

    by_torchrun = rel.final_weights(tmp_path / "torchrun")
    by_launch = rel.final_weights(tmp_path / "launch")
    # Not vacuous: the last iterations changed the weights.
    before = rel.final_weights(tmp_path / "launch", "model_0000001.pth")
    assert rel.weights_moved(by_launch, before) > 1e-3
    rel.assert_same_weights(by_torchrun, by_launch, rtol=1e-5, atol=1e-7)


def test_torchrun_with_a_contradicting_num_gpus_is_one_error_line(rel, tiny_dataset, tmp_path):
    proc, out = _run([*TORCHRUN, *rel.tiny_args(tmp_path, flags=["--num-gpus", "1"])])
    assert proc.returncode != 0
    assert out.count("train_net.py: error:") == 1, out[-4000:]
    assert "--num-gpus 1 but torchrun started 2 process(es), 2 per machine" in out
    assert not os.listdir(tmp_path)  # nothing written
