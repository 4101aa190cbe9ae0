"""A write that runs out of disk space: the atomic writer removes its partial file and raises one
:class:`DiskFullError` naming the file, about how many bytes it needs and the free space; the
file it would have replaced, and the checkpoint ``last_checkpoint`` names, are unchanged. The
device is simulated here by a file object that fails with ``ENOSPC`` after a byte budget (a real
full tmpfs: tests/reliability/test_disk_full.py)."""

import errno
import io
import os
import pickle
import shutil
from collections import namedtuple

import numpy as np
import pytest
import torch

from dcnv2.checkpoint import DCNv2Checkpointer, atomic
from dcnv2.checkpoint.atomic import (
    DiskFullError,
    atomic_pickle,
    atomic_save,
    atomic_write,
    atomic_write_text,
    payload_bytes,
)
from dcnv2.checkpoint.weights_io import save_weights
from dcnv2.errors import USER_ERRORS, DCNv2Error

FREE = 123_456


class _SmallDisk(io.FileIO):
    """A file whose writes fail with ENOSPC (or ``code``) once ``budget`` bytes are written."""

    budget = 1000
    code = errno.ENOSPC

    def write(self, data):
        if self.tell() + len(data) > self.budget:
            room = max(0, self.budget - self.tell())
            if room:
                super().write(bytes(data[:room]))
            raise OSError(self.code, os.strerror(self.code))
        return super().write(data)


@pytest.fixture
def small_disk(monkeypatch):
    """Files opened by the atomic writer hold at most ``_SmallDisk.budget`` bytes;
    ``shutil.disk_usage`` reports :data:`FREE` bytes free."""
    real_fdopen = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        if "b" not in mode:
            return real_fdopen(fd, mode, *args, **kwargs)
        return _SmallDisk(fd, "w", closefd=True)

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(atomic.os, "fdopen", fdopen)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - FREE, FREE))
    monkeypatch.setattr(_SmallDisk, "budget", 1000)
    return _SmallDisk


def _leftovers(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".tmp"))


def test_torch_save_on_a_full_disk_is_one_error_naming_file_size_and_free_space(
    tmp_path, small_disk
):
    path = tmp_path / "model.pth"
    path.write_bytes(b"previous file")
    obj = {"w": torch.zeros(10_000), "b": torch.zeros(5, dtype=torch.float64)}
    with pytest.raises(DiskFullError) as info:
        atomic_save(obj, str(path))
    error = info.value
    # torch.save reports the ENOSPC of its writes as a RuntimeError (inline_container.cc);
    # the writer recognises the OSError it was raised while handling.
    assert isinstance(error, OSError) and isinstance(error, DCNv2Error)
    assert isinstance(error, USER_ERRORS)
    assert (error.errno, error.filename) == (errno.ENOSPC, str(path))
    message = str(error)
    assert message.startswith(f"Cannot write {path}: no space left on the device. ")
    assert "It needs about 40,040 bytes (0.0 MiB)" in message  # 10_000 x 4 + 5 x 8
    assert f"{FREE:,} bytes (0.1 MiB) are free there" in message
    assert "model.pth is unchanged (the partial write was removed)" in message
    assert "\n" not in message
    assert path.read_bytes() == b"previous file"
    assert _leftovers(tmp_path) == []


def test_every_writer_reports_a_full_disk(tmp_path, small_disk):
    arrays = {"model": {"w": np.zeros(1000, dtype=np.float32)}}
    for write, name in [
        (lambda p: atomic_pickle(arrays, p), "a.pkl"),
        (lambda p: save_weights(arrays, p), "converted.pkl"),
        (lambda p: save_weights({"model": {"w": torch.zeros(1000)}}, p), "converted.pth"),
    ]:
        with pytest.raises(DiskFullError, match=f"Cannot write {tmp_path / name}: .* about 4,000"):
            write(str(tmp_path / name))
        assert not (tmp_path / name).exists()
    # Bytes written by hand: the bytes written before the failure are the lower bound.
    with pytest.raises(DiskFullError, match=r"about 1,000 bytes .* was not created"):
        with atomic_write(str(tmp_path / "raw.bin")) as f:
            f.write(b"x" * 5000)
    assert _leftovers(tmp_path) == []


def test_a_text_write_that_fails_on_flush(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with pytest.raises(DiskFullError, match="disk quota exceeded. It needs about 13 bytes"):
        atomic_write_text(str(tmp_path / "last_checkpoint"), "model_0000001")
    monkeypatch.setattr(atomic.os, "fsync", real_fsync)
    assert _leftovers(tmp_path) == [] and not (tmp_path / "last_checkpoint").exists()


def test_other_write_errors_keep_their_type(tmp_path, small_disk):
    # The control: an I/O error is not a full disk and stays what it was.
    small_disk.code = errno.EIO
    try:
        with pytest.raises(Exception) as info:
            atomic_save({"w": torch.zeros(10_000)}, str(tmp_path / "m.pth"))
    finally:
        small_disk.code = errno.ENOSPC
    assert not isinstance(info.value, DiskFullError)
    assert _leftovers(tmp_path) == []


def test_a_checkpoint_that_does_not_fit_leaves_last_checkpoint_on_the_previous_one(
    tmp_path, small_disk
):
    model = torch.nn.Linear(100, 50)
    checkpointer = DCNv2Checkpointer(model, str(tmp_path))
    small_disk.budget = 10**9
    checkpointer.save("model_0000001", iteration=1)
    previous = (tmp_path / "model_0000001.pth").read_bytes()
    small_disk.budget = 1000
    with pytest.raises(DiskFullError) as info:
        checkpointer.save("model_0000003", iteration=3)
    message = str(info.value)
    assert message.startswith(f"Cannot write {tmp_path / 'model_0000003.pth'}: no space left")
    # The estimate: the larger of the tensors (5050 floats) and the previous checkpoint.
    estimate = max(payload_bytes(model.state_dict()), len(previous))
    assert f"about {estimate:,} bytes" in message and estimate > 20_000
    assert message.endswith(
        f"{tmp_path / 'last_checkpoint'} still names {tmp_path / 'model_0000001.pth'}, which "
        "--resume continues from."
    )
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert (tmp_path / "model_0000001.pth").read_bytes() == previous
    assert not (tmp_path / "model_0000003.pth").exists() and _leftovers(tmp_path) == []
    with open(tmp_path / "model_0000001.pth", "rb") as f:
        assert torch.load(f, weights_only=True)["iteration"] == 1


def test_payload_bytes_counts_tensors_arrays_and_bytes():
    obj = {"a": [torch.zeros(3, dtype=torch.float16), (np.zeros(2), b"xyz")], "n": 5, "s": "t"}
    assert payload_bytes(obj) == 6 + 16 + 3
    assert payload_bytes(pickle) == 0
