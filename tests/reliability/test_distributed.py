"""Two CPU processes through detectron2's launch (gloo), one image each, compute what one process
with both images computes (gradient averaging, data sharding, LR schedule); checkpoints are
written by one process only and resume with another number of processes; a non-finite loss on
one process stops both, with one message."""

import glob
import os


def test_two_processes_equal_one_stop_together_and_resume_on_one(
    rel, train_net, tiny_dataset, reference_run, tmp_path
):
    # 2 processes x 1 image, float64; a NaN loss on process 1 only, at iteration 2.
    env = dict(rel.FLOAT64, DCNV2_TEST_NAN_AT="2@1")
    proc = rel.run_faulty(rel.tiny_args(tmp_path, flags=["--num-gpus", "2"]), tiny_dataset, env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "World size: 2" in (tmp_path / "log.txt").read_text()
    # Both processes stopped at once; the main one reported it, once, without a traceback.
    assert out.count("error:") == 1 and "Traceback" not in out, out[-3000:]
    assert "non-finite at iteration 2: loss_box_reg=nan (process 1)." in out
    assert f"The last checkpoint, {tmp_path / 'model_0000001.pth'}, was written" in out

    # Written by process 0 only: process 1 logs no save, and there is no per-process file.
    assert "Saving checkpoint" not in (tmp_path / "log.txt.rank1").read_text()
    events = [os.path.basename(p) for p in glob.glob(str(tmp_path / "events.out.tfevents.*"))]
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["config.yaml", "last_checkpoint", "log.txt", "log.txt.rank1", "metrics.json"]
        + ["model_0000001.pth"]
        + events
    )

    # After 2 iterations (warm-up: a different LR each), the weights of 1 process x 2 images.
    two = rel.final_weights(tmp_path, "model_0000001.pth")
    one = rel.final_weights(reference_run, "model_0000001.pth")
    rel.assert_same_weights(two, one, rtol=1e-10, atol=1e-13)

    # Resumed by 1 process: the uninterrupted 1-process run's final weights.
    rel.run_in_process(train_net, rel.tiny_args(tmp_path, flags=["--resume"]), rel.FLOAT64)
    reference = rel.final_weights(reference_run)
    assert rel.weights_moved(reference, one) > 1e-3  # iterations 2-3 changed the weights
    rel.assert_same_weights(rel.final_weights(tmp_path), reference, rtol=1e-10, atol=1e-13)
