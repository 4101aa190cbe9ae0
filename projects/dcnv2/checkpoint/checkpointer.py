"""``DCNv2Checkpointer``: detectron2's ``DetectionCheckpointer`` with safe file loading."""

import contextlib
import functools
import pickle
from typing import Any, Dict, Iterator, Optional

import detectron2.engine.defaults as d2_defaults
from detectron2.checkpoint import DetectionCheckpointer

from .atomic import AtomicCheckpointMixin
from .integrity import CheckedLoadMixin
from .loading import load_pickle_file, load_torch_file

__all__ = ["DCNv2Checkpointer", "build_checkpointer", "dcnv2_checkpointer_in_d2_defaults"]


class DCNv2Checkpointer(AtomicCheckpointMixin, CheckedLoadMixin, DetectionCheckpointer):
    """``DetectionCheckpointer`` that reads weight files without running code hidden in them.

    ``.pth``/``.pt`` files are loaded tensors-only and ``.pkl`` files with an unpickler that only
    rebuilds numpy arrays (see :mod:`dcnv2.checkpoint.loading`); a file that needs anything else
    raises :class:`~dcnv2.checkpoint.loading.UnsafeCheckpointError` unless ``allow_unsafe``.
    Everything else (model-zoo formats, Caffe2 name matching, URL queries) is detectron2's.
    Checkpoints and ``last_checkpoint`` are written atomically (:mod:`.atomic`); a missing,
    truncated or ill-fitting weights file is one clear error (:mod:`.integrity`).

    Args:
        model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
        allow_unsafe: unpickle any object (``MODEL.DCNV2.ALLOW_UNSAFE_WEIGHTS``). Only for files
            from a trusted source.
        allow_shape_mismatch: skip tensors whose shape differs from the model's instead of
            raising (``MODEL.DCNV2.ALLOW_SHAPE_MISMATCH``; never when resuming).
    """

    def __init__(
        self,
        model,
        save_dir: str = "",
        *,
        allow_unsafe: bool = False,
        allow_shape_mismatch: bool = False,
        save_to_disk: Optional[bool] = None,
        **checkpointables: Any,
    ):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.allow_unsafe = allow_unsafe
        self.allow_shape_mismatch = allow_shape_mismatch

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith(".pkl"):
            return _pkl_checkpoint(load_pickle_file(filename, allow_unsafe=self.allow_unsafe))
        if filename.endswith(".pyth"):
            return _pycls_checkpoint(
                filename, load_torch_file(filename, allow_unsafe=self.allow_unsafe)
            )
        # detectron2's own path for .pth and the rest: it calls self._torch_load.
        return super()._load_file(filename)

    def _torch_load(self, f: str) -> Any:
        return load_torch_file(f, allow_unsafe=self.allow_unsafe)


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


def build_checkpointer(cfg, model, save_dir: str = "", **kwargs: Any) -> DCNv2Checkpointer:
    """A :class:`DCNv2Checkpointer` that follows ``cfg.MODEL.DCNV2.ALLOW_UNSAFE_WEIGHTS`` and
    ``ALLOW_SHAPE_MISMATCH``."""
    return DCNv2Checkpointer(model, save_dir, **_options(cfg), **kwargs)


def _allow_unsafe(cfg) -> bool:
    return bool(cfg.MODEL.get("DCNV2", {}).get("ALLOW_UNSAFE_WEIGHTS", False))


def _options(cfg) -> Dict[str, bool]:
    shapes = bool(cfg.MODEL.get("DCNV2", {}).get("ALLOW_SHAPE_MISMATCH", False))
    return {"allow_unsafe": _allow_unsafe(cfg), "allow_shape_mismatch": shapes}


@contextlib.contextmanager
def dcnv2_checkpointer_in_d2_defaults(cfg) -> Iterator[None]:
    """Make ``DefaultTrainer.__init__`` and ``DefaultPredictor`` build a
    :class:`DCNv2Checkpointer` (following ``cfg``) instead of a ``DetectionCheckpointer``.

    They look the class up in ``detectron2.engine.defaults`` when called; the name is swapped
    only inside the ``with`` block.
    """
    original = d2_defaults.DetectionCheckpointer
    d2_defaults.DetectionCheckpointer = functools.partial(DCNv2Checkpointer, **_options(cfg))
    try:
        yield
    finally:
        d2_defaults.DetectionCheckpointer = original
