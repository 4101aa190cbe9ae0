"""``DCNv2Checkpointer``: detectron2's ``DetectionCheckpointer``, safe loading, atomic saves."""

import pickle
from typing import Any, Dict, Optional

from detectron2.checkpoint import DetectionCheckpointer

from ..config import YAML_KEYS, RunKeys, cfg_get, run_keys
from ..errors import WeightsError
from .atomic import AtomicCheckpointMixin, last_checkpoint_pointer
from .integrity import (
    UNREADABLE_ERRORS,
    check_checkpoint_dict,
    check_fit,
    check_weights_file,
    unreadable_file_error,
)
from .loading import UnsafeCheckpointError, load_pickle_file, load_torch_file

__all__ = ["DCNv2Checkpointer", "build_checkpointer"]


class DCNv2Checkpointer(AtomicCheckpointMixin, DetectionCheckpointer):
    """``DetectionCheckpointer`` with safe, checked loading and atomic saves.

    Args:
        allow_unsafe: unpickle any object (trusted files only).
        allow_shape_mismatch: skip tensors whose shape differs from the model's (never on resume).
        keys: the config keys named in messages.
    """

    def __init__(
        self,
        model,
        save_dir: str = "",
        *,
        allow_unsafe: bool = False,
        allow_shape_mismatch: bool = False,
        keys: RunKeys = YAML_KEYS,
        save_to_disk: Optional[bool] = None,
        **checkpointables: Any,
    ):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.allow_unsafe = allow_unsafe
        self.allow_shape_mismatch = allow_shape_mismatch
        self.keys = keys
        self._resuming = False

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
            if not path or "://" not in path or isinstance(e, WeightsError):
                raise
            raise WeightsError(
                f"Cannot fetch weights {path} ({self._source()}): {e}. Download the file "
                "yourself and give its local path instead."
            ) from None

    def _load_file(self, filename: str) -> Dict[str, Any]:
        try:
            checkpoint = self._read_file(filename)
        except (UnsafeCheckpointError, WeightsError):
            raise
        except UNREADABLE_ERRORS as e:
            raise unreadable_file_error(filename, self._source(), e) from None
        check_checkpoint_dict(checkpoint, filename, self._source())
        return checkpoint

    def _read_file(self, filename: str) -> Dict[str, Any]:
        source = self._source()
        if filename.endswith(".pkl"):
            return _pkl_checkpoint(
                load_pickle_file(filename, allow_unsafe=self.allow_unsafe, source=source)
            )
        if filename.endswith(".pyth"):
            return _pycls_checkpoint(
                filename, load_torch_file(filename, allow_unsafe=self.allow_unsafe, source=source)
            )
        # detectron2's own path for .pth and the rest: it calls self._torch_load.
        return super()._load_file(filename)

    def _torch_load(self, f: str) -> Any:
        return load_torch_file(f, allow_unsafe=self.allow_unsafe, source=self._source())

    def _load_model(self, checkpoint: Any):
        num_tensors = len(checkpoint.get("model", {}))
        name_matching = bool(checkpoint.get("matching_heuristics", False))
        incompatible = super()._load_model(checkpoint)
        check_fit(
            incompatible,
            num_tensors=num_tensors,
            name_matching=name_matching,
            model_keys=self.model.state_dict().keys(),
            source=self._source(),
            resuming=self._resuming,
            allow_shape_mismatch=self.allow_shape_mismatch,
            shape_option=self.keys.allow_shape_mismatch or YAML_KEYS.allow_shape_mismatch,
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
