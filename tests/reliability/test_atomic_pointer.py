"""``last_checkpoint`` is replaced only after the checkpoint it names is complete on disk.

With a new file name at every save (``model_0000123.pth``, as ``PeriodicCheckpointer`` writes
them), a pointer written first would name a file that does not exist yet: a kill between the two
writes leaves a run that cannot resume. Checked deterministically (the order of the renames) and
by SIGKILL at random moments of a writer that saves under new names and keeps one file."""

import multiprocessing
import os
import random
import signal

import torch

from dcnv2.checkpoint import DCNv2Checkpointer
from dcnv2.errors import WeightsError


class _Holder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("value", torch.zeros(500_000, dtype=torch.float64))  # 4 MB


def test_the_checkpoint_is_renamed_into_place_before_the_pointer(tmp_path, monkeypatch):
    renamed = []
    real_replace = os.replace

    def replace(src, dst, **kwargs):
        # What the target holds when it appears: the pointer must name an existing file.
        if os.path.basename(dst) == "last_checkpoint":
            with open(src) as f:
                named = f.read().strip()
            renamed.append(("last_checkpoint", os.path.exists(os.path.join(tmp_path, named))))
        else:
            renamed.append((os.path.basename(dst), True))
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    checkpointer = DCNv2Checkpointer(_Holder(), str(tmp_path))
    for i in range(2):
        checkpointer.save(f"model_{i:07d}", iteration=i)
    assert renamed == [
        ("model_0000000.pth", True),
        ("last_checkpoint", True),
        ("model_0000001.pth", True),
        ("last_checkpoint", True),
    ]


def _save_under_new_names(folder: str, start: int) -> None:
    # A forked child must not use the parent's OpenMP pool (it would hang): one thread.
    torch.set_num_threads(1)
    holder = _Holder()
    checkpointer = DCNv2Checkpointer(holder, folder)
    i = start
    while True:
        holder.value.fill_(i)
        checkpointer.save(f"model_{i:07d}", iteration=i)
        previous = os.path.join(folder, f"model_{i - 1:07d}.pth")
        if os.path.exists(previous):  # keep one checkpoint, as max_to_keep=1 does
            os.remove(previous)
        i += 1


def test_sigkill_between_checkpoint_and_pointer_with_new_names(tmp_path):
    folder = str(tmp_path)
    fork = multiprocessing.get_context("fork")
    rng = random.Random(1)
    resumed, last = [], -1
    for round_ in range(8):
        writer = fork.Process(target=_save_under_new_names, args=(folder, 1000 * round_ + 1))
        writer.daemon = True
        writer.start()
        writer.join(timeout=rng.uniform(0.1, 0.4))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        assert writer.exitcode == -signal.SIGKILL
        if not os.path.exists(os.path.join(folder, "last_checkpoint")):
            continue  # killed before the first save completed
        holder = _Holder()
        try:
            extra = DCNv2Checkpointer(holder, folder).resume_or_load("", resume=True)
        except WeightsError as e:
            raise AssertionError(f"round {round_}: cannot resume: {e}") from None
        with open(os.path.join(folder, "last_checkpoint")) as f:
            assert f.read() == f"model_{extra['iteration']:07d}.pth"
        assert torch.equal(holder.value, torch.full_like(holder.value, extra["iteration"]))
        assert extra["iteration"] >= 1000 * round_ + 1 or extra["iteration"] == last
        last = extra["iteration"]
        resumed.append(last)
    assert len(resumed) >= 4  # most rounds saved at least once and were resumed
