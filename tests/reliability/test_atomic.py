"""Atomic writes: the target keeps its old bytes or gets all the new ones, whatever happens
during the write (an exception, or SIGKILL at a random moment), and last_checkpoint only ever
names a complete checkpoint."""

import multiprocessing
import os
import random
import signal
import stat

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer

from dcnv2.checkpoint import DCNv2Checkpointer
from dcnv2.checkpoint.atomic import atomic_save, atomic_write, atomic_write_text
from dcnv2.errors import WeightsError


def test_atomic_write_replaces_the_file_with_normal_permissions(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    atomic_write_text(str(target), "new")
    assert target.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["file.txt"]


def test_an_exception_during_the_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "ckpt.pth"
    atomic_save({"x": torch.ones(3)}, str(target))
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_write(str(target)) as f:
            f.write(b"partial")
            raise RuntimeError("disk on fire")
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pth"]
    with pytest.raises(ValueError, match="mode 'w' or 'wb'"):
        with atomic_write(str(target), "a"):
            pass


class _Holder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("value", torch.zeros(1_000_000, dtype=torch.float64))  # 8 MB


def _write_forever(checkpointer_class, folder: str, start: int) -> None:
    # Rewrites the same file again and again, as detectron2's BestCheckpointer does with
    # model_best.pth, tagging it as the last checkpoint each time. A forked child must not use
    # the parent's OpenMP pool (it would hang): one thread.
    torch.set_num_threads(1)
    holder = _Holder()
    checkpointer = checkpointer_class(holder, folder, save_to_disk=True)
    i = start
    while True:
        holder.value.fill_(i)
        checkpointer.save("model_best", count=i)
        i += 1


def _kill_at_random_moments(checkpointer_class, folder, rounds=12):
    """Start a writer, SIGKILL it after a random time, try to resume; repeat. Returns the
    number of broken resumes and of kills that cut a write short (a temporary file left)."""
    fork = multiprocessing.get_context("fork")  # torch is already imported: starts at once
    rng = random.Random(0)
    broken = cut_short = 0
    last = -1
    for round_ in range(rounds):
        args = (checkpointer_class, folder, 1000 * round_)
        writer = fork.Process(target=_write_forever, args=args, daemon=True)
        writer.start()
        writer.join(timeout=rng.uniform(0.05, 0.4))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        assert writer.exitcode == -signal.SIGKILL
        cut_short += any(f.endswith(".tmp") for f in os.listdir(folder))
        if not os.path.exists(os.path.join(folder, "last_checkpoint")):
            continue  # killed before the first save completed
        holder = _Holder()
        try:
            extra = DCNv2Checkpointer(holder, folder).resume_or_load("", resume=True)
        except WeightsError:
            broken += 1
            continue
        # Complete and self-consistent: the values the writer put in that save.
        assert torch.equal(holder.value, torch.full_like(holder.value, extra["count"]))
        assert extra["count"] >= 1000 * round_ or extra["count"] == last
        last = extra["count"]
    assert last >= 0 or broken  # the writers did save
    return broken, cut_short


def test_sigkill_at_random_moments_never_leaves_a_broken_checkpoint(tmp_path):
    broken, cut_short = _kill_at_random_moments(DCNv2Checkpointer, str(tmp_path))
    assert broken == 0
    assert cut_short > 0  # kills did land in the middle of writes
    # At most the one write cut short is left over: the next save removes it.
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".tmp")]) <= 1


def test_detectron2s_checkpointer_breaks_under_the_same_kills(tmp_path):
    # The control: writing in place, detectron2 leaves last_checkpoint naming a truncated file.
    broken, _ = _kill_at_random_moments(DetectionCheckpointer, str(tmp_path))
    assert broken > 0


def test_a_save_removes_partial_writes_of_the_checkpoint_and_of_the_pointer(tmp_path):
    """What kills leave (one cut-short write of the checkpoint, one of last_checkpoint) goes at
    the next save; other files stay."""
    left = [".model_best.pth.k1x.tmp", ".last_checkpoint.k2y.tmp"]
    kept = [".model_final.pth.k3z.tmp", "notes.tmp"]  # another checkpoint's write; not ours
    for name in left + kept:
        (tmp_path / name).write_bytes(b"partial")
    DCNv2Checkpointer(_Holder(), str(tmp_path)).save("model_best")
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["last_checkpoint", "model_best.pth"])
    assert (tmp_path / "last_checkpoint").read_text() == "model_best.pth"
