"""Atomic file writes: a reader, or a run killed at any moment, sees the old file or the new one.

A full disk raises :class:`DiskFullError` and keeps the old file.
"""

import contextlib
import errno
import glob
import logging
import os
import pickle
import secrets
import shutil
from typing import IO, Any, Iterator, Optional, Tuple

import numpy as np
import torch

from ..errors import DCNv2Error

__all__ = [
    "AtomicCheckpointMixin",
    "DiskFullError",
    "payload_bytes",
    "atomic_pickle",
    "atomic_save",
    "atomic_write",
    "atomic_write_text",
    "last_checkpoint_pointer",
    "remove_stale_temporaries",
]

logger = logging.getLogger(__name__)

# Temporary files are ".<target name>.<random>.tmp" next to their target.
_TMP_SUFFIX = ".tmp"


def last_checkpoint_pointer(save_dir: str) -> str:
    """The file in which fvcore's ``Checkpointer`` names a run's latest checkpoint."""
    return os.path.join(save_dir, "last_checkpoint")


_NO_SPACE = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)


class DiskFullError(DCNv2Error, OSError):
    """No space left on the device or quota while writing ``filename``; nothing was written."""


def _no_space_error(error: Optional[BaseException]) -> Optional[OSError]:
    """The ``ENOSPC``/``EDQUOT`` ``OSError`` that is ``error`` or caused it, else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            return error
        error = error.__cause__ or error.__context__
    return None


def _size(n: int) -> str:
    return f"{n:,} bytes ({n / 2**20:.1f} MiB)"


def payload_bytes(obj: Any) -> int:
    """About the ``torch.save`` size of ``obj``: the bytes of its tensors and arrays."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    return 0


def _disk_full_error(path: str, error: BaseException, needed: int) -> DiskFullError:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = f"{_size(shutil.disk_usage(folder).free)} are free there"
    except OSError:
        free = "the free space is unknown"
    kept = "is unchanged" if os.path.exists(path) else "was not created"
    reason = "no space left on the device" if error.errno == errno.ENOSPC else "disk quota exceeded"
    full = DiskFullError(
        f"Cannot write {path}: {reason}. It needs about {_size(needed)}, and {free}; "
        f"{os.path.basename(path)} {kept} (the partial write was removed). Free some space, or "
        "write to another disk."
    )
    full.errno, full.filename = error.errno, path
    return full


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
    """Create ``.<name>.<random>.tmp`` in ``folder`` with the umask's mode; return (fd, path)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        path = os.path.join(folder, f".{name}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name for {name!r} in {folder!r}")


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", *, size_hint: Optional[int] = None) -> Iterator[IO]:
    """Open a temporary file that replaces ``path`` when the ``with`` block ends without error.

    Args:
        mode: "wb" or "w".
        size_hint: about how many bytes the file will have, for the message of a full disk.
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
    except BaseException as e:
        written = 0
        with contextlib.suppress(OSError):
            written = os.path.getsize(tmp)
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        no_space = _no_space_error(e) if isinstance(e, Exception) else None
        if no_space is not None:
            raise _disk_full_error(path, no_space, max(size_hint or 0, written)) from None
        raise
    _fsync_dir(folder)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)``, atomically."""
    with atomic_write(path, "wb", size_hint=payload_bytes(obj)) as f:
        torch.save(obj, f)


def atomic_pickle(obj: Any, path: str) -> None:
    """``pickle.dump(obj, file, protocol=2)`` to ``path``, atomically."""
    with atomic_write(path, "wb", size_hint=payload_bytes(obj)) as f:
        pickle.dump(obj, f, protocol=2)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path``, atomically."""
    with atomic_write(path, "w", size_hint=len(text)) as f:
        f.write(text)


def remove_stale_temporaries(path: str) -> int:
    """Delete the temporary files that killed writes of ``path`` left; return how many."""
    folder, name = os.path.split(os.path.abspath(path))
    removed = 0
    for tmp in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*{_TMP_SUFFIX}")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
            removed += 1
    return removed


class AtomicCheckpointMixin:
    """``save`` and ``tag_last_checkpoint`` of an fvcore ``Checkpointer``, written atomically."""

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
        # A kill may have cut this file or the pointer short.
        for path in (save_file, last_checkpoint_pointer(self.save_dir)):
            removed = remove_stale_temporaries(self.path_manager.get_local_path(path))
            if removed:
                self.logger.info(f"Removed {removed} partial write(s) of {path} left by a kill")
        self.logger.info(f"Saving checkpoint to {save_file}")
        previous = self.get_checkpoint_file() if self.has_checkpoint() else None
        local_previous = previous and self.path_manager.get_local_path(previous)
        # About the checkpoint's size: its tensors, or the previous checkpoint's size.
        size_hint = payload_bytes(data)
        if local_previous and os.path.isfile(local_previous):
            size_hint = max(size_hint, os.path.getsize(local_previous))
        try:
            with atomic_write(
                self.path_manager.get_local_path(save_file), "wb", size_hint=size_hint
            ) as f:
                torch.save(data, f)
        except DiskFullError as e:
            pointer = last_checkpoint_pointer(self.save_dir)
            kept = (
                f"{pointer} still names {previous}, which --resume continues from"
                if previous
                else "no checkpoint of this run was written yet"
            )
            full = DiskFullError(f"{e} {kept}.")
            full.errno, full.filename = e.errno, e.filename
            raise full from None
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        pointer = last_checkpoint_pointer(self.save_dir)
        atomic_write_text(self.path_manager.get_local_path(pointer), last_filename_basename)
