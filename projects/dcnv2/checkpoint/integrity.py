"""One clear :class:`~dcnv2.errors.WeightsError` for a file that cannot be a checkpoint:
missing, a folder, unreadable, empty, text, or cut short, judged by its first and last bytes."""

import codecs
import contextlib
import os
from pickle import UnpicklingError
from typing import Optional
from zipfile import BadZipFile

from ..errors import WeightsError

# What torch.load / pickle raise on a file cut short or not written by torch.save / pickle
# (KeyError: torch.load's legacy reader of a file that is not a checkpoint).
READ_ERRORS = (RuntimeError, EOFError, UnpicklingError, BadZipFile, ValueError, OSError, KeyError)
_EXPECTED = "Expected a checkpoint written by torch.save (.pth) or a detectron2 model-zoo .pkl"


def check_weights_file(path: str, source: str, resuming: bool = False) -> None:
    """Refuse a local ``path`` that cannot be a checkpoint, judged by its first and last bytes.

    Args:
        source: where it came from, for the message (``"given by MODEL.WEIGHTS"``; "" for none).
        resuming: it was named by ``last_checkpoint``.
    """
    if not path or "://" in path:
        return
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "is not a regular file"  # /dev/null, FIFO
        hint = "expected a .pth/.pkl checkpoint file (or a URL such as detectron2://...)"
        if not os.path.exists(path):
            what = "does not exist"
            hint = "restore it, or start without --resume" if resuming else hint
        raise WeightsError(f"Weights file {path}{f' ({source})' if source else ''} {what}; {hint}")
    try:
        problem = diagnose_file(path)
    except PermissionError as e:
        raise unreadable_file_error(path, source, e) from None
    if problem is not None:
        raise WeightsError(_cannot_read(path, source, problem))


# torch.save's format is a zip archive; its last bytes are the end-of-central-directory record.
_ZIP_MAGIC = b"PK\x03\x04"
_ZIP_END = b"PK\x05\x06"
_ZIP_END_SEARCH = 22 + 65535  # the record, and a zip comment of at most 64 KiB before it
# Legacy torch.save: pickles of this magic number, then raw tensor bytes (no STOP opcode).
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"
_TEXT_HINTS = (
    ("<", "an HTML or XML page: a download that returned a web page instead of the file?"),
    ("version https://git-lfs", "a Git LFS pointer: fetch the file itself with `git lfs pull`"),
)
_CUT_SHORT = (
    "it is truncated or not a checkpoint ({}; a copy or download cut short looks like this)"
)


def _text_start(head: bytes) -> Optional[str]:
    """The first line of ``head`` if it is printable UTF-8 text, else None."""
    try:  # the incremental decoder accepts a head that ends inside a multi-byte character
        text = codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        return None
    if not all(c.isprintable() or c in "\t\n\r\f\v" for c in text):
        return None
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first[:60] + ("..." if len(first) > 60 else "")


def diagnose_file(path: str, *, failed: bool = False) -> Optional[str]:
    """Why the local file ``path`` cannot be a checkpoint, from its first and last bytes, or None.

    Args:
        failed: loading it already failed, so a text file ending with ``.`` is named as text.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(1024)
        f.seek(max(0, size - _ZIP_END_SEARCH))
        tail = f.read()
    if size == 0:
        return "the file is empty"
    if head.startswith(_ZIP_MAGIC):
        if _ZIP_END in tail:
            return None
        return _CUT_SHORT.format("truncated: the zip archive's end record is missing")
    is_pickle = len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5
    if is_pickle and not head.startswith(_TORCH_LEGACY_MAGIC) and not tail.endswith(b"."):
        return _CUT_SHORT.format("truncated: the pickle's final STOP opcode is missing")
    first_line = _text_start(head)
    if first_line is not None and (failed or not tail.endswith(b".")):
        hint = next((h for start, h in _TEXT_HINTS if first_line.startswith(start)), "")
        return f"it is a text file starting with {first_line!r}" + (f" ({hint})" if hint else "")
    return None


def _cannot_read(path: str, source: str, problem: str) -> str:
    size = os.path.getsize(path) if os.path.isfile(path) else "?"
    where = f", {source}" if source else ""
    return f"Cannot read weights file {path} ({size} bytes{where}): {problem}. {_EXPECTED}"


def unreadable_file_error(filename: str, source: str, error: BaseException) -> WeightsError:
    """The error for a file whose reading raised ``error`` (one of :data:`READ_ERRORS`)."""
    if isinstance(error, PermissionError):
        where = f" ({source})" if source else ""
        return WeightsError(
            f"Weights file {filename}{where} is not readable: {error.strerror}; expected a file "
            "this user can read"
        )
    problem = None
    with contextlib.suppress(OSError):  # not a local file
        problem = diagnose_file(filename, failed=True)
    if problem is None:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        problem = _CUT_SHORT.format(f"{type(error).__name__}: {reason}")
    return WeightsError(_cannot_read(filename, source, problem))
