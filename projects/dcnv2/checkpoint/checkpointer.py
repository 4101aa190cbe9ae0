"""``DCNv2Checkpointer``: detectron2's ``DetectionCheckpointer`` with safe, checked file loading
and atomic saves."""

import pickle
from typing import Any, Dict, Optional

from detectron2.checkpoint import DetectionCheckpointer

from ..dialects import YAML_KEYS, RunKeys, run_keys
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
    """``DetectionCheckpointer`` that reads weight files without running code hidden in them.

    ``.pth``/``.pt`` files are loaded tensors-only and ``.pkl`` files with an unpickler that only
    rebuilds numpy arrays (see :mod:`dcnv2.checkpoint.loading`); a file that needs anything else
    raises :class:`~dcnv2.checkpoint.loading.UnsafeCheckpointError` unless ``allow_unsafe``.
    Everything else (model-zoo formats, Caffe2 name matching, URL queries) is detectron2's.
    Checkpoints and ``last_checkpoint`` are written atomically (:mod:`.atomic`); a missing,
    truncated or ill-fitting weights file is one clear error (:mod:`.integrity`).

    It overrides detectron2's documented extension points only: ``_load_file`` (read a file
    into a checkpoint dict), ``_torch_load`` (detectron2's reader of ``.pth`` files) and
    ``_load_model`` (load the dict into the model), besides the public ``load``,
    ``resume_or_load``, ``save`` and ``tag_last_checkpoint``.

    Args:
        model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
        allow_unsafe: unpickle any object (``MODEL.DCNV2.ALLOW_UNSAFE_WEIGHTS``). Only for files
            from a trusted source.
        allow_shape_mismatch: skip tensors whose shape differs from the model's instead of
            raising (``MODEL.DCNV2.ALLOW_SHAPE_MISMATCH``; never when resuming).
        keys: the config keys named in messages (where the weights came from).
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
    # The .pkl formats detectron2 reads: its own model zoo ({"model", "__author__"}) as is; a
    # Caffe2/Detectron model ({"blobs": ...}) or an ImageNet model (the blobs themselves) for
    # name matching, without the SGD momentum blobs.
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
    """A :class:`DCNv2Checkpointer` for a YAML config or a LazyConfig: it follows the config's
    ``allow_unsafe_weights`` / ``allow_shape_mismatch`` keys and names its keys in messages.

    Args:
        cfg: a YAML config (``MODEL.DCNV2.ALLOW_UNSAFE_WEIGHTS``, ``ALLOW_SHAPE_MISMATCH``) or a
            LazyConfig (``train.allow_unsafe_weights``).
        model, save_dir, checkpointables: as ``DetectionCheckpointer``.
    """
    keys = run_keys(cfg)
    return DCNv2Checkpointer(
        model,
        save_dir,
        allow_unsafe=bool(keys.value(cfg, keys.allow_unsafe_weights, False)),
        allow_shape_mismatch=bool(keys.value(cfg, keys.allow_shape_mismatch, False)),
        keys=keys,
        **checkpointables,
    )
