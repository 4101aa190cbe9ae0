"""One clear error for weights that cannot be used: a file that is missing, unreadable, truncated
or not a checkpoint, tensors whose shapes do not fit the model, or no tensor that fits at all.

detectron2 asserts on a missing file, surfaces torch's zip-reader error for a truncated one, and
only warns about mismatched shapes (then trains with those tensors left at their random
initialisation). :class:`CheckedLoadMixin` raises :class:`~dcnv2.errors.WeightsError` instead,
naming the file, where it came from (``MODEL.WEIGHTS`` or ``last_checkpoint``) and, for shapes,
each tensor. Skipping mismatched tensors stays available for fine-tuning on other classes
(``allow_shape_mismatch``, ``MODEL.DCNV2.ALLOW_SHAPE_MISMATCH``), but never when resuming: a
run's own checkpoint must fit its model exactly.
"""

import os
import pickle
import zipfile
from typing import Any, Dict

from ..errors import WeightsError
from .loading import UnsafeCheckpointError

__all__ = ["CheckedLoadMixin", "SHAPE_OPTION"]

SHAPE_OPTION = "MODEL.DCNV2.ALLOW_SHAPE_MISMATCH"
_MAX_LISTED = 12
# What torch.load / pickle raise on a file cut short or not written by torch.save / pickle.
# A truncated torch.save file fails in any of these ways, depending on where it was cut (an
# OSError "Invalid argument" from torch's zip reader included).
_UNREADABLE = (
    RuntimeError,
    EOFError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    ValueError,
    OSError,
)


def _is_local(path: str) -> bool:
    return "://" not in path


class CheckedLoadMixin:
    """Load-time checks for a ``DetectionCheckpointer`` subclass (put it before that class in the
    bases). Attributes: ``allow_shape_mismatch`` (default False), ``weights_option`` (the config
    key named in messages, default ``"MODEL.WEIGHTS"``)."""

    allow_shape_mismatch: bool = False
    weights_option: str = "MODEL.WEIGHTS"
    _resuming: bool = False

    def _source(self) -> str:
        if self._resuming:
            return f"named by {os.path.join(self.save_dir, 'last_checkpoint')} (--resume)"
        return f"given by {self.weights_option}"

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        self._resuming = bool(resume and self.has_checkpoint())
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self._resuming = False

    def load(self, path: str, *args, **kwargs) -> Dict[str, Any]:
        if path and _is_local(path) and not os.path.isfile(path):
            hint = (
                "; the run that wrote the pointer may have been moved or the file deleted: "
                "restore it, or start without --resume"
                if self._resuming
                else "; expected a .pth/.pkl checkpoint file (or a URL such as detectron2://...)"
            )
            what = "is a folder" if os.path.isdir(path) else "does not exist"
            raise WeightsError(f"Weights file {path} ({self._source()}) {what}{hint}")
        try:
            return super().load(path, *args, **kwargs)
        except OSError as e:
            if not path or _is_local(path) or isinstance(e, WeightsError):
                raise
            raise WeightsError(
                f"Cannot fetch weights {path} ({self._source()}): {e}. Download the file "
                "yourself and give its local path instead."
            ) from None

    def _load_file(self, filename: str) -> Dict[str, Any]:
        try:
            checkpoint = super()._load_file(filename)
        except UnsafeCheckpointError:
            raise
        except PermissionError as e:
            raise WeightsError(
                f"Weights file {filename} ({self._source()}) is not readable: {e.strerror}"
            ) from None
        except _UNREADABLE as e:
            size = os.path.getsize(filename) if os.path.isfile(filename) else "?"
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WeightsError(
                f"Cannot read weights file {filename} ({size} bytes, {self._source()}): it is "
                f"truncated or not a checkpoint ({type(e).__name__}: {reason}). Expected a file "
                "written by torch.save (.pth) or a detectron2 model-zoo .pkl; a copy or download "
                "that was cut short looks like this."
            ) from None
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
            raise WeightsError(
                f"Weights file {filename} ({self._source()}) holds a "
                f"{type(checkpoint.get('model', checkpoint)).__name__}, not a state dict; "
                "expected a dict of tensors, or {'model': dict of tensors, ...}"
            )
        return checkpoint

    def _load_model(self, checkpoint: Any):
        num_tensors = len(checkpoint.get("model", {}))
        heuristics = bool(checkpoint.get("matching_heuristics", False))
        incompatible = super()._load_model(checkpoint)
        shapes = incompatible.incorrect_shapes
        if shapes and (self._resuming or not self.allow_shape_mismatch):
            listed = [
                f"  {name}: {tuple(ckpt)} in the file, {tuple(model)} in the model"
                for name, ckpt, model in shapes[:_MAX_LISTED]
            ]
            if len(shapes) > _MAX_LISTED:
                listed.append(f"  ... and {len(shapes) - _MAX_LISTED} more")
            hint = (
                "A checkpoint of this run must fit its model exactly: was the config changed "
                "since the run started?"
                if self._resuming
                else "Check that the config matches the model the weights come from (e.g. "
                "MODEL.ROI_HEADS.NUM_CLASSES, MODEL.RESNETS.DEPTH). To fine-tune on other "
                f"classes, leaving these tensors at their initialisation, set {SHAPE_OPTION} True."
            )
            raise WeightsError(
                f"{len(shapes)} tensor(s) of the weights ({self._source()}) do not fit the "
                "model:\n" + "\n".join(listed) + "\n" + hint
            )
        # Name matching (Caffe2/pycls files) drops what it cannot match and logs it itself.
        used = num_tensors - len(incompatible.unexpected_keys) - len(shapes)
        if num_tensors and used <= 0 and not heuristics:
            raise WeightsError(
                f"None of the {num_tensors} tensors of the weights ({self._source()}) matches a "
                f"parameter of the model by name, e.g. the file has "
                f"{sorted(incompatible.unexpected_keys)[:3]}, the model "
                f"{sorted(self.model.state_dict())[:3]}. Expected weights of a detectron2 model "
                "of this architecture (convert other formats with the tools in tools/)."
            )
        return incompatible
