"""Atomic file writes: a reader, or a run killed at any moment, sees the old file or the new one,
never a truncated one.

A file is written into a temporary file in the same folder, flushed and ``fsync``-ed, then renamed
over its target (``os.replace``, atomic on POSIX and Windows) and the folder is ``fsync``-ed so the
rename itself survives a power loss. The file gets the permissions of any file the user creates
(``0o666`` less the umask). :class:`AtomicCheckpointMixin` gives a detectron2/fvcore
``Checkpointer`` this for checkpoints and the ``last_checkpoint`` pointer, written in that order:
the pointer only ever names a complete file.
"""

import contextlib
import glob
import logging
import os
import pickle
import secrets
from typing import IO, Any, Iterator, Tuple

import torch

__all__ = [
    "AtomicCheckpointMixin",
    "atomic_pickle",
    "atomic_save",
    "atomic_write",
    "atomic_write_text",
    "remove_stale_temporaries",
]

logger = logging.getLogger(__name__)

# Temporary files are ".<target name>.<random>.tmp" next to their target.
_TMP_SUFFIX = ".tmp"


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows, where folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _create_temporary(folder: str, name: str) -> Tuple[int, str]:
    """Create ``.<name>.<random>.tmp`` in ``folder`` for writing; return (descriptor, path).

    Created with mode ``0o666``, which the kernel reduces by the umask exactly as for any file
    the user creates (0644 under umask 022). ``tempfile.mkstemp`` would give 0600, and reading
    the umask to ``chmod`` afterwards takes ``os.umask`` twice, a process-wide change another
    thread can observe.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        path = os.path.join(folder, f".{name}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name for {name!r} in {folder!r}")


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file that replaces ``path`` when the ``with`` block ends without error.

    On an exception the temporary file is removed and ``path`` is left as it was. A process
    killed inside the block leaves ``path`` untouched and at most a ``.<name>.*.tmp`` file next
    to it (see :func:`remove_stale_temporaries`). The new file has the permissions a plain
    ``open(path, "w")`` of a new file would give (``0o666`` less the umask).

    Args:
        path: the file to write; its folder must exist.
        mode: "wb" or "w".
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write opens files for writing, mode 'w' or 'wb'; got {mode!r}")
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = _create_temporary(folder, os.path.basename(path))
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)``, atomically."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def atomic_pickle(obj: Any, path: str) -> None:
    """``pickle.dump(obj, file, protocol=2)`` to ``path``, atomically (detectron2's ``.pkl``
    weights format)."""
    with atomic_write(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path``, atomically."""
    with atomic_write(path, "w") as f:
        f.write(text)


def remove_stale_temporaries(path: str) -> int:
    """Delete the temporary files that killed writes of ``path`` left behind; return how many.

    Only call this where no other process is writing ``path`` at the same time.
    """
    folder, name = os.path.split(os.path.abspath(path))
    removed = 0
    for tmp in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*{_TMP_SUFFIX}")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
            removed += 1
    return removed


class AtomicCheckpointMixin:
    """``save`` and ``tag_last_checkpoint`` for an fvcore ``Checkpointer`` subclass, written
    atomically (put it before the ``Checkpointer`` class in the bases).

    fvcore writes both files in place, so a run killed during a save leaves a truncated
    ``model_XXXXXXX.pth`` that ``last_checkpoint`` may already name; ``--resume`` then fails or,
    worse, the pointer is lost. Here the checkpoint is complete on disk before the pointer is
    replaced, and the pointer is replaced in one rename.
    """

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"checkpoint name {name!r} must be a file name, not a path")
        # Partial writes left by a kill, of this file and of the pointer (a kill between two
        # saves may cut either short): at most the write in progress is ever left over.
        for path in (save_file, os.path.join(self.save_dir, "last_checkpoint")):
            removed = remove_stale_temporaries(self.path_manager.get_local_path(path))
            if removed:
                self.logger.info(f"Removed {removed} partial write(s) of {path} left by a kill")
        self.logger.info(f"Saving checkpoint to {save_file}")
        with atomic_write(self.path_manager.get_local_path(save_file), "wb") as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        pointer = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write_text(self.path_manager.get_local_path(pointer), last_filename_basename)
