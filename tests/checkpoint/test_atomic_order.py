"""The durability order of an atomic write, recorded through the ``os`` calls it makes: the
temporary file is fsync-ed with all its bytes, then renamed over the target, then the folder is
fsync-ed (so the rename survives a power loss). A SIGKILL test cannot see any of this: a killed
process loses nothing the kernel already has."""

import os
import stat

import pytest
import torch

from dcnv2.checkpoint.atomic import atomic_save, atomic_write_text


@pytest.fixture
def recorded(monkeypatch):
    """The fsync and replace calls, in order: ("fsync", "file", size) for a regular file,
    ("fsync", "dir", path) for a folder, ("replace", src, dst)."""
    calls = []
    real_fsync, real_replace, real_open = os.fsync, os.replace, os.open
    opened = {}

    def fsync(fd):
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            calls.append(("fsync", "dir", opened.get(fd)))
        else:
            calls.append(("fsync", "file", info.st_size))
        return real_fsync(fd)

    def open_(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        opened[fd] = os.fspath(path)
        return fd

    def replace(src, dst, **kwargs):
        calls.append(("replace", os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "open", open_)
    return calls


@pytest.mark.parametrize("what", ["text", "checkpoint"])
def test_fsync_file_then_rename_then_fsync_folder(tmp_path, recorded, what):
    target = tmp_path / "target"
    target.write_text("old")
    if what == "text":
        atomic_write_text(str(target), "new contents")
    else:
        atomic_save({"x": torch.arange(1000)}, str(target))
    size = target.stat().st_size
    assert [c[0] for c in recorded] == ["fsync", "replace", "fsync"], recorded
    # The file's fsync came with every byte written (flushed first), before the rename ...
    assert recorded[0] == ("fsync", "file", size)
    _, src, dst = recorded[1]
    assert dst == str(target) and os.path.dirname(src) == str(tmp_path) and src != dst
    # ... and the folder that holds the rename was fsync-ed after it.
    assert recorded[2] == ("fsync", "dir", str(tmp_path))


def test_a_failed_write_neither_renames_nor_syncs(tmp_path, recorded):
    target = tmp_path / "target"
    target.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_text(str(target), b"bytes into a text file")
    assert recorded == [] and target.read_text() == "old"
