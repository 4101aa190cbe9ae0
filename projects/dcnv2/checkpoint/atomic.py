"""Atomic file writes: a reader, or a run killed at any moment, sees the old file or the new one;
a full disk raises :class:`DiskFullError` and keeps the old file."""

import contextlib
import errno
import glob
import os
import pickle
import secrets
import shutil
from typing import IO, Any, Iterator, List, Optional

import numpy as np
import torch

from ..errors import DCNv2Error

_NO_SPACE = {errno.ENOSPC: "no space left on the device"}
if hasattr(errno, "EDQUOT"):
    _NO_SPACE[errno.EDQUOT] = "disk quota exceeded"


def last_checkpoint_pointer(save_dir: str) -> str:
    """The file in which fvcore's ``Checkpointer`` names a run's latest checkpoint."""
    return os.path.join(save_dir, "last_checkpoint")


class DiskFullError(DCNv2Error, OSError):
    """No space left on the device or quota while writing ``filename``; nothing was written."""


def payload_bytes(obj: Any) -> int:
    """About the ``torch.save`` size of ``obj``: the bytes of its tensors and arrays."""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return int(obj.nbytes)
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, dict):
        obj = list(obj.values())
    return sum(map(payload_bytes, obj)) if isinstance(obj, (list, tuple)) else 0


def _size(n: int) -> str:
    return f"{n:,} bytes ({n / 2**20:.1f} MiB)"


def _no_space(error: Optional[BaseException]) -> Optional[OSError]:
    """The ENOSPC/EDQUOT ``OSError`` that is ``error`` or caused it (torch.save reports the
    OSError of its writes as the context of a RuntimeError), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _disk_full_error(path: str, folder: str, error: OSError, needed: int) -> DiskFullError:
    try:
        free = f"{_size(shutil.disk_usage(folder).free)} are free there"
    except OSError:
        free = "the free space is unknown"
    kept = "is unchanged" if os.path.exists(path) else "was not created"
    full = DiskFullError(
        f"Cannot write {path}: {_NO_SPACE[error.errno]}. It needs about {_size(needed)}, and "
        f"{free}; {os.path.basename(path)} {kept} (the partial write was removed). Free some "
        "space, or write to another disk."
    )
    full.errno, full.filename = error.errno, path
    return full


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", *, size_hint: Optional[int] = None) -> Iterator[IO]:
    """Open a temporary file that replaces ``path`` when the ``with`` block ends without error.

    Args:
        mode: "wb" or "w".
        size_hint: about how many bytes the file will have, for the message of a full disk.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write opens files for writing, mode 'w' or 'wb'; got {mode!r}")
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o666)  # the umask's mode, as open() gives
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        no_space = _no_space(e) if isinstance(e, Exception) else None
        if no_space is not None:
            raise _disk_full_error(path, folder, no_space, max(size_hint or 0, written)) from None
        raise
    # fsync the folder so that the rename survives a power loss; Windows cannot open folders,
    # some file systems refuse it (the rename is atomic all the same).
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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


def remove_stale_temporaries(path: str) -> List[str]:
    """Delete the temporary files that killed writes of ``path`` left; return their names."""
    folder, name = os.path.split(os.path.abspath(path))
    stale = glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp"))
    for tmp in stale:
        os.remove(tmp)
    return stale
