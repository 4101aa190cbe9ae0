"""``DCNv2Checkpointer``: detectron2's ``DetectionCheckpointer``, safe loading, atomic saves."""

import os
import pickle
from typing import Any, Dict

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..config import YAML_KEYS, RunKeys, cfg_get, run_keys
from ..errors import DCNv2Error, WeightsError
from .atomic import (
    DiskFullError,
    atomic_write,
    atomic_write_text,
    last_checkpoint_pointer,
    payload_bytes,
    remove_stale_temporaries,
)
from .integrity import READ_ERRORS, check_weights_file, unreadable_file_error
from .loading import load_pickle_file, load_torch_file

__all__ = ["DCNv2Checkpointer", "build_checkpointer"]


class DCNv2Checkpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with safe, checked loading and atomic saves.

    Args:
        allow_unsafe: unpickle any object (trusted files only).
        allow_shape_mismatch: skip tensors whose shape differs from the model's (never on resume).
        keys: the config keys named in messages.
        kwargs: ``save_to_disk`` and the checkpointables, as ``DetectionCheckpointer`` takes them.
    """

    def __init__(
        self,
        model,
        save_dir: str = "",
        *,
        allow_unsafe: bool = False,
        allow_shape_mismatch: bool = False,
        keys: RunKeys = YAML_KEYS,
        **kwargs: Any,
    ):
        super().__init__(model, save_dir, **kwargs)
        self.allow_unsafe = allow_unsafe
        self.allow_shape_mismatch = allow_shape_mismatch
        self.keys = keys
        self._resuming = False

    def save(self, name: str, **kwargs: Any) -> None:
        """fvcore's ``save``, atomic; a full disk names the checkpoint --resume continues from."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()}, **kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        pointer = last_checkpoint_pointer(self.save_dir)
        for path in (save_file, pointer):
            for tmp in remove_stale_temporaries(path):
                self.logger.info(f"Removed {tmp}, a partial write left by a kill")
        self.logger.info(f"Saving checkpoint to {save_file}")
        previous = self.get_checkpoint_file() if self.has_checkpoint() else None
        size_hint = payload_bytes(data)
        if previous and os.path.isfile(previous):
            size_hint = max(size_hint, os.path.getsize(previous))
        try:
            with atomic_write(save_file, size_hint=size_hint) as f:
                torch.save(data, f)
        except DiskFullError as e:
            kept = "no checkpoint of this run was written yet"
            if previous:
                kept = f"{pointer} still names {previous}, which --resume continues from"
            e.args = (f"{e} {kept}.",)
            raise
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(last_checkpoint_pointer(self.save_dir), last_filename_basename)

    def _source(self) -> str:
        if self._resuming:
            return f"named by {last_checkpoint_pointer(self.save_dir)} (--resume)"
        return f"given by {self.keys.weights}"

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        self._resuming = bool(resume and self.has_checkpoint())
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self._resuming = False

    def load(self, path: str, *args, **kwargs) -> Dict[str, Any]:
        check_weights_file(path, self._source(), self._resuming)
        try:
            return super().load(path, *args, **kwargs)
        except OSError as e:
            if "://" not in (path or "") or isinstance(e, WeightsError):
                raise
            raise WeightsError(
                f"Cannot fetch weights {path} ({self._source()}): {e}. Download the file "
                "yourself and give its local path instead."
            ) from None

    def _load_file(self, filename: str) -> Dict[str, Any]:
        source = self._source()
        safety = dict(allow_unsafe=self.allow_unsafe, source=source)
        try:
            if filename.endswith(".pkl"):
                checkpoint = _pkl_checkpoint(load_pickle_file(filename, **safety))
            elif filename.endswith(".pyth"):
                checkpoint = _pycls_checkpoint(filename, load_torch_file(filename, **safety))
            else:  # detectron2's own path for .pth and the rest: it calls self._torch_load
                checkpoint = super()._load_file(filename)
        except DCNv2Error:  # already says what is wrong
            raise
        except READ_ERRORS as e:
            raise unreadable_file_error(filename, source, e) from None
        if not isinstance(checkpoint.get("model"), dict):
            raise WeightsError(
                f"Weights file {filename} ({source}) holds a "
                f"{type(checkpoint['model']).__name__}, not a state dict; expected a dict of "
                "tensors, or {'model': dict of tensors, ...}"
            )
        return checkpoint

    def _torch_load(self, f: str) -> Any:
        return load_torch_file(f, allow_unsafe=self.allow_unsafe, source=self._source())

    def _load_model(self, checkpoint: Any):
        """detectron2's ``_load_model``; refuses misshapen tensors (unless allowed) and weights
        of which no tensor is used."""
        num_tensors = len(checkpoint["model"])
        name_matching = bool(checkpoint.get("matching_heuristics", False))
        incompatible = super()._load_model(checkpoint)
        shapes = incompatible.incorrect_shapes
        if shapes and (self._resuming or not self.allow_shape_mismatch):
            listed = [
                f"  {k}: {tuple(ckpt)} in the file, {tuple(m)} in the model"
                for k, ckpt, m in shapes
            ]
            option = self.keys.allow_shape_mismatch or YAML_KEYS.allow_shape_mismatch
            hint = (
                "A checkpoint of this run must fit its model exactly: was the config changed "
                "since the run started?"
                if self._resuming
                else "Check that the config matches the model the weights come from (e.g. "
                "MODEL.ROI_HEADS.NUM_CLASSES, MODEL.RESNETS.DEPTH). To fine-tune on other "
                f"classes, leaving these tensors at their initialisation, set {option} True."
            )
            raise WeightsError(
                f"{len(shapes)} tensor(s) of the weights ({self._source()}) do not fit the "
                "model:\n" + "\n".join(listed) + "\n" + hint
            )
        used = num_tensors - len(incompatible.unexpected_keys) - len(shapes)
        if num_tensors and used <= 0 and not name_matching:  # heuristics log their own drops
            raise WeightsError(
                f"None of the {num_tensors} tensors of the weights ({self._source()}) matches a "
                f"parameter of the model by name, e.g. the file has "
                f"{sorted(incompatible.unexpected_keys)[:3]}, the model "
                f"{sorted(self.model.state_dict())[:3]}. Expected weights of a detectron2 model "
                "of this architecture (convert other formats with the tools in tools/)."
            )
        return incompatible


def _pkl_checkpoint(data: Any) -> Dict[str, Any]:
    # Detectron2's zoo .pkl as is; Caffe2/ImageNet blobs for name matching, without momentum.
    if not isinstance(data, dict):
        raise pickle.UnpicklingError(f"a .pkl checkpoint must hold a dict, not {type(data)}")
    if "model" in data and "__author__" in data:
        return data
    blobs = data.get("blobs", data)
    weights = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
    return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}


def _pycls_checkpoint(filename: str, data: Any) -> Dict[str, Any]:
    if not isinstance(data, dict) or "model_state" not in data:
        raise ValueError(f"Cannot load .pyth file {filename}: a pycls checkpoint has 'model_state'")
    weights = {
        k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")
    }
    return {"model": weights, "__author__": "pycls", "matching_heuristics": True}


def build_checkpointer(cfg, model, save_dir: str = "", **checkpointables: Any) -> DCNv2Checkpointer:
    """A :class:`DCNv2Checkpointer` following a YAML config's or LazyConfig's weight keys."""
    keys = run_keys(cfg)
    return DCNv2Checkpointer(
        model,
        save_dir,
        allow_unsafe=bool(cfg_get(cfg, keys.allow_unsafe_weights, False)),
        allow_shape_mismatch=bool(cfg_get(cfg, keys.allow_shape_mismatch, False)),
        keys=keys,
        **checkpointables,
    )
