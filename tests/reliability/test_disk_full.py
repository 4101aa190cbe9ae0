"""A disk that fills up during training: train_net.py ends with one error line naming the
checkpoint it could not write, the bytes it needs and the free space; the previous checkpoint is
intact and still the one ``last_checkpoint`` names. The disk is a small tmpfs mounted by the test
(root only; skipped elsewhere)."""

import os
import subprocess

import pytest
import torch

from dcnv2.checkpoint.atomic import DiskFullError, atomic_save


@pytest.fixture
def small_tmpfs(tmp_path):
    """Mount a tmpfs of 6 MiB: room for one checkpoint of the tiny model (about 4.3 MB with the
    optimizer's momentum) and the logs, not for two checkpoints; yields its path."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_atomic_save_on_a_real_full_disk(small_tmpfs):
    path = small_tmpfs / "big.pth"
    with pytest.raises(DiskFullError) as info:
        atomic_save({"w": torch.zeros(2_000_000)}, str(path))  # 8 MB on 6 MiB
    message = str(info.value)
    assert message.startswith(f"Cannot write {path}: no space left on the device. ")
    assert "It needs about 8,000,000 bytes (7.6 MiB)" in message
    assert "bytes (6.0 MiB) are free there" in message  # the partial file is gone
    assert os.listdir(small_tmpfs) == []


def test_training_stops_with_one_error_line_and_the_previous_checkpoint(
    rel, tiny_dataset, small_tmpfs
):
    out = small_tmpfs / "output"
    # Checkpoints after iterations 0 (model_0000000.pth) and 1 (model_0000001.pth): the second
    # does not fit.
    short = ["SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1", "SOLVER.STEPS", "(1,)"]
    proc = rel.run_faulty(rel.tiny_args(out, *short), tiny_dataset, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr[-3000:]
    failed, previous = out / "model_0000001.pth", out / "model_0000000.pth"
    assert errors[0].startswith(
        f"train_net.py: error: Cannot write {failed}: no space left on the device. It needs about "
    ), errors[0]
    assert "MiB) are free there; model_0000001.pth was not created" in errors[0]
    assert errors[0].endswith(
        f"{out / 'last_checkpoint'} still names {previous}, which --resume continues from."
    )
    assert "Traceback" not in proc.stderr
    assert (out / "last_checkpoint").read_text() == "model_0000000.pth"
    checkpoint = torch.load(previous, map_location="cpu", weights_only=True)
    assert checkpoint["iteration"] == 0 and checkpoint["model"]
    assert not failed.exists() and not (out / "model_final.pth").exists()
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
