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

from dcnv2.checkpoint import DCNv2Checkpointer
from dcnv2.checkpoint.atomic import atomic_save, atomic_write, atomic_write_text


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


def _write_forever(folder: str, start: int) -> None:
    # Rewrites the same file again and again, as detectron2's BestCheckpointer does with
    # model_best.pth, tagging it as the last checkpoint each time. A forked child must not use
    # the parent's OpenMP pool (it would hang): one thread.
    torch.set_num_threads(1)
    holder = _Holder()
    checkpointer = DCNv2Checkpointer(holder, folder, save_to_disk=True)
    i = start
    while True:
        holder.value.fill_(i)
        checkpointer.save("model_best", count=i)
        i += 1


def test_sigkill_at_random_moments_never_leaves_a_broken_checkpoint(tmp_path):
    folder = str(tmp_path)
    fork = multiprocessing.get_context("fork")  # torch is already imported: starts at once
    rng = random.Random(0)
    last, cut_short = -1, 0
    for round_ in range(12):
        writer = fork.Process(target=_write_forever, args=(folder, 1000 * round_), daemon=True)
        writer.start()
        writer.join(timeout=rng.uniform(0.05, 0.4))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        assert writer.exitcode == -signal.SIGKILL
        if not os.path.exists(tmp_path / "last_checkpoint"):
            continue  # killed before the first save completed
        assert (tmp_path / "last_checkpoint").read_text() == "model_best.pth"
        holder = _Holder()
        extra = DCNv2Checkpointer(holder, folder).resume_or_load("", resume=True)
        count = extra["count"]
        # Complete and self-consistent: the values the writer put in that save.
        assert torch.equal(holder.value, torch.full_like(holder.value, count))
        assert count >= 1000 * round_ or count == last
        last = count
        # At most the one write that was cut short is left over (the next save removes it).
        partial = [f for f in os.listdir(folder) if f.endswith(".tmp")]
        assert len(partial) <= 1
        cut_short += len(partial)
    assert last >= 0 and cut_short > 0  # kills did land in the middle of writes
