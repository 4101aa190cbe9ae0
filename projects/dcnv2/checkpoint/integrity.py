"""One clear :class:`~dcnv2.errors.WeightsError` for weights that cannot be used.

A missing, unreadable, truncated or non-checkpoint file, or tensors that do not fit the model.
"""

import os
import pickle
import zipfile
from typing import Any, Iterable, List, Optional, Sequence, Tuple

from ..errors import WeightsError

__all__ = [
    "UNREADABLE_ERRORS",
    "check_checkpoint_dict",
    "check_fit",
    "check_weights_file",
    "diagnose_file",
    "unreadable_file_error",
]

# What torch.load / pickle raise on a file cut short or not written by torch.save / pickle.
UNREADABLE_ERRORS = (
    RuntimeError,
    EOFError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    ValueError,
    OSError,
    KeyError,  # torch.load's legacy reader of a file that is not a checkpoint
)


def check_weights_file(path: str, source: str, resuming: bool) -> None:
    """Refuse a local ``path`` that cannot be a checkpoint, judged by its first and last bytes.

    Args:
        source: where it came from, for the message (``"given by MODEL.WEIGHTS"``; "" for none).
        resuming: it was named by ``last_checkpoint``.
    """
    if not path or "://" in path:
        return
    where = f" ({source})" if source else ""
    if not os.path.isfile(path):
        hint = "; expected a .pth/.pkl checkpoint file (or a URL such as detectron2://...)"
        if os.path.isdir(path):
            what = "is a folder"
        elif os.path.exists(path):  # a device file (/dev/null), a FIFO or a socket
            what = "is not a regular file"
        else:
            what = "does not exist"
            if resuming:
                hint = (
                    "; the run that wrote the pointer may have been moved or the file deleted: "
                    "restore it, or start without --resume"
                )
        raise WeightsError(f"Weights file {path}{where} {what}{hint}")
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


def _text_start(head: bytes) -> Optional[str]:
    """The first line of ``head`` if it is printable UTF-8 text, else None."""
    if b"\x00" in head:
        return None
    for cut in range(4):  # the head may end inside a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
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
    cut_short = "; a copy or download cut short looks like this"
    if head.startswith(_ZIP_MAGIC):
        if _ZIP_END not in tail:
            return (
                "it is truncated or not a checkpoint (truncated: the zip archive's end record "
                f"is missing{cut_short})"
            )
        return None
    is_pickle = len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5
    if is_pickle and not head.startswith(_TORCH_LEGACY_MAGIC) and not tail.endswith(b"."):
        return (
            "it is truncated or not a checkpoint (truncated: the pickle's final STOP opcode is "
            f"missing{cut_short})"
        )
    first_line = _text_start(head)
    if first_line is not None and (failed or not tail.endswith(b".")):
        hint = next((h for start, h in _TEXT_HINTS if first_line.startswith(start)), "")
        return f"it is a text file starting with {first_line!r}" + (f" ({hint})" if hint else "")
    return None


def _cannot_read(path: str, source: str, problem: str) -> str:
    size = os.path.getsize(path) if os.path.isfile(path) else "?"
    where = f", {source}" if source else ""
    return (
        f"Cannot read weights file {path} ({size} bytes{where}): {problem}. Expected a "
        "checkpoint written by torch.save (.pth) or a detectron2 model-zoo .pkl"
    )


def unreadable_file_error(filename: str, source: str, error: BaseException) -> WeightsError:
    """The error for a file whose reading raised ``error`` (one of :data:`UNREADABLE_ERRORS`)."""
    where = f" ({source})" if source else ""
    if isinstance(error, PermissionError):
        return WeightsError(
            f"Weights file {filename}{where} is not readable: {error.strerror}; expected a file "
            "this user can read"
        )
    problem = None
    if os.path.isfile(filename):
        try:
            problem = diagnose_file(filename, failed=True)
        except OSError:
            pass
    if problem is None:
        text = str(error).strip()
        reason = text.splitlines()[0] if text else type(error).__name__
        problem = (
            f"it is truncated or not a checkpoint ({type(error).__name__}: {reason}; a copy or "
            "download cut short looks like this)"
        )
    return WeightsError(_cannot_read(filename, source, problem))


def check_checkpoint_dict(checkpoint: Any, filename: str, source: str) -> None:
    """Check ``checkpoint`` is ``{"model": dict of tensors, ...}``."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise WeightsError(
            f"Weights file {filename} ({source}) holds a "
            f"{type(checkpoint.get('model', checkpoint)).__name__}, not a state dict; "
            "expected a dict of tensors, or {'model': dict of tensors, ...}"
        )


def check_fit(
    incompatible,
    *,
    num_tensors: int,
    name_matching: bool,
    model_keys: Iterable[str],
    source: str,
    resuming: bool,
    allow_shape_mismatch: bool,
    shape_option: str = "MODEL.DCNV2.ALLOW_SHAPE_MISMATCH",
) -> None:
    """Check the loaded weights fit the model: no misshapen tensor (unless allowed), one used.

    Args:
        incompatible: fvcore's ``_IncompatibleKeys`` of the load.
        name_matching: matched by name heuristics (Caffe2, pycls), which log their own drops.
        shape_option: the config key that allows shape mismatches, named in the message.
    """
    shapes: Sequence[Tuple[str, Any, Any]] = incompatible.incorrect_shapes
    if shapes and (resuming or not allow_shape_mismatch):
        listed: List[str] = [
            f"  {name}: {tuple(ckpt)} in the file, {tuple(model)} in the model"
            for name, ckpt, model in shapes
        ]
        hint = (
            "A checkpoint of this run must fit its model exactly: was the config changed "
            "since the run started?"
            if resuming
            else "Check that the config matches the model the weights come from (e.g. "
            "MODEL.ROI_HEADS.NUM_CLASSES, MODEL.RESNETS.DEPTH). To fine-tune on other "
            f"classes, leaving these tensors at their initialisation, set {shape_option} True."
        )
        raise WeightsError(
            f"{len(shapes)} tensor(s) of the weights ({source}) do not fit the "
            "model:\n" + "\n".join(listed) + "\n" + hint
        )
    used = num_tensors - len(incompatible.unexpected_keys) - len(shapes)
    if num_tensors and used <= 0 and not name_matching:
        raise WeightsError(
            f"None of the {num_tensors} tensors of the weights ({source}) matches a "
            f"parameter of the model by name, e.g. the file has "
            f"{sorted(incompatible.unexpected_keys)[:3]}, the model "
            f"{sorted(model_keys)[:3]}. Expected weights of a detectron2 model "
            "of this architecture (convert other formats with the tools in tools/)."
        )
