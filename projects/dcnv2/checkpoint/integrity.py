"""One clear error for weights that cannot be used: a file that is missing, unreadable, truncated
or not a checkpoint, tensors whose shapes do not fit the model, or no tensor that fits at all.

detectron2 asserts on a missing file, surfaces torch's zip-reader error for a truncated one, and
only warns about mismatched shapes (then trains with those tensors left at their random
initialisation). The checks below raise :class:`~dcnv2.errors.WeightsError` instead, naming the
file, where it came from (``MODEL.WEIGHTS`` or ``last_checkpoint``) and, for shapes, each tensor.
:class:`~dcnv2.checkpoint.DCNv2Checkpointer` runs them as it loads. Skipping mismatched tensors
stays available for fine-tuning on other classes (``allow_shape_mismatch``,
``MODEL.DCNV2.ALLOW_SHAPE_MISMATCH``), but never when resuming: a run's own checkpoint must fit
its model exactly.
"""

import os
import pickle
import zipfile
from typing import Any, Iterable, List, Sequence, Tuple

from ..errors import WeightsError

__all__ = [
    "UNREADABLE_ERRORS",
    "check_checkpoint_dict",
    "check_fit",
    "check_weights_file",
    "unreadable_file_error",
]

# What torch.load / pickle raise on a file cut short or not written by torch.save / pickle.
# A truncated torch.save file fails in any of these ways, depending on where it was cut (an
# OSError "Invalid argument" from torch's zip reader included).
UNREADABLE_ERRORS = (
    RuntimeError,
    EOFError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    ValueError,
    OSError,
)


def check_weights_file(path: str, source: str, resuming: bool) -> None:
    """A local ``path`` names an existing file (URLs are fetched later).

    Args:
        path: the weights file.
        source: where it came from, for the message (``"given by MODEL.WEIGHTS"``).
        resuming: it was named by ``last_checkpoint`` (``--resume``).
    """
    if not path or "://" in path or os.path.isfile(path):
        return
    hint = (
        "; the run that wrote the pointer may have been moved or the file deleted: "
        "restore it, or start without --resume"
        if resuming
        else "; expected a .pth/.pkl checkpoint file (or a URL such as detectron2://...)"
    )
    what = "is a folder" if os.path.isdir(path) else "does not exist"
    raise WeightsError(f"Weights file {path} ({source}) {what}{hint}")


def unreadable_file_error(filename: str, source: str, error: BaseException) -> WeightsError:
    """The error for a file whose reading raised ``error`` (one of :data:`UNREADABLE_ERRORS`)."""
    if isinstance(error, PermissionError):
        return WeightsError(f"Weights file {filename} ({source}) is not readable: {error.strerror}")
    size = os.path.getsize(filename) if os.path.isfile(filename) else "?"
    text = str(error).strip()
    reason = text.splitlines()[0] if text else type(error).__name__
    return WeightsError(
        f"Cannot read weights file {filename} ({size} bytes, {source}): it is "
        f"truncated or not a checkpoint ({type(error).__name__}: {reason}). Expected a file "
        "written by torch.save (.pth) or a detectron2 model-zoo .pkl; a copy or download "
        "that was cut short looks like this."
    )


def check_checkpoint_dict(checkpoint: Any, filename: str, source: str) -> None:
    """``checkpoint`` is ``{"model": dict of tensors, ...}``, as ``Checkpointer._load_file``
    must return."""
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
    """The loaded weights fit the model: no tensor of the wrong shape (unless allowed and not
    resuming), and at least one tensor used.

    Args:
        incompatible: fvcore's ``_IncompatibleKeys`` of the load (``incorrect_shapes``: list of
            (name, shape in the file, shape in the model); ``unexpected_keys``).
        num_tensors: tensors in the file.
        name_matching: the file was matched to the model by name heuristics (Caffe2, pycls),
            which drop what they cannot match and log it themselves.
        model_keys: the model's state-dict keys, quoted when nothing matched.
        source, resuming: as :func:`check_weights_file`.
        allow_shape_mismatch: skip tensors of the wrong shape instead.
        shape_option: the config key that allows it, named in the message.
    """
    shapes: Sequence[Tuple[str, Any, Any]] = incompatible.incorrect_shapes
    if shapes and (resuming or not allow_shape_mismatch):
        # Every tensor: the list is what tells which config keys differ.
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
