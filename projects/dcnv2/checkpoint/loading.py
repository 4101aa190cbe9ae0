"""Reading checkpoint files without running code hidden in them: ``.pkl`` numpy arrays and dicts
only, other files ``torch.load(weights_only=True)``; anything else raises
:class:`UnsafeCheckpointError` unless ``allow_unsafe`` (trusted files only)."""

import io
import pickle
import re
from typing import Any

import torch
from detectron2.utils.file_io import PathManager

from ..errors import DCNv2Error
from .integrity import READ_ERRORS, check_weights_file, unreadable_file_error

__all__ = ["UnsafeCheckpointError", "load_checkpoint_file", "load_pickle_file", "load_torch_file"]

# (module, name) pairs the .pkl unpickler may rebuild. numpy 2 moved numpy.core to numpy._core;
# Python 3 pickles (protocol < 3) write bytes as _codecs.encode(str, "latin1").
_PKL_ALLOWED_GLOBALS = {
    (f"numpy.{core}.multiarray", name)
    for core in ("core", "_core")
    for name in ("_reconstruct", "scalar")
}
_PKL_ALLOWED_GLOBALS |= {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}
_PKL_ALLOWED_GLOBALS.add(("_codecs", "encode"))

# torch's weights-only unpickler refuses an object with one of these phrases (by version);
# any other failure means a damaged file.
_TORCH_REFUSAL = re.compile(
    r"unsupported GLOBAL (\S+) whose module|Unsupported global: GLOBAL (\S+)"
    r"|Unsupported class (\S+)|(\S+) was not an allowed global"
    r"|reduce for unrecognized function (\S+)|allowlisted via `add_safe_globals`,? but got (.+)"
)


class UnsafeCheckpointError(DCNv2Error, pickle.UnpicklingError):
    """A checkpoint needs arbitrary Python objects, which could run code when unpickled."""


def _refuse(path: str, global_name: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"Refusing to load {path!r}: it asks the unpickler for the Python global {global_name!r}, "
        "and unpickling objects other than tensors/arrays and containers can run code. If you "
        "trust its source: MODEL.DCNV2.ALLOW_UNSAFE_WEIGHTS True (YAML configs), "
        "train.allow_unsafe_weights=True (LazyConfigs), --allow-unsafe (convert tools) or "
        "allow_unsafe=True (Python)."
    )


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: str):
        super().__init__(io.BytesIO(data), encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PKL_ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise _refuse(self.path, f"{module}.{name}")


def load_pickle_file(path: str, *, allow_unsafe: bool = False, source: str = "") -> Any:
    """Unpickle a ``.pkl`` checkpoint (numpy arrays in dicts), refusing anything else.

    Args:
        path: a local path or a detectron2 ``PathManager`` URI.
        source: where the path came from, for messages (``"given by MODEL.WEIGHTS"``).
    """
    check_weights_file(path, source)
    try:
        with PathManager.open(path, "rb") as f:
            data = f.read()
        if allow_unsafe:
            return pickle.loads(data, encoding="latin1")
        return _ArraysOnlyUnpickler(data, path).load()
    except UnsafeCheckpointError:
        raise
    except READ_ERRORS as e:
        raise unreadable_file_error(path, source, e) from None


def load_torch_file(path: str, *, allow_unsafe: bool = False, source: str = "") -> Any:
    """``torch.load`` a checkpoint onto the CPU, tensors-only unless ``allow_unsafe``."""
    local = PathManager.get_local_path(path)
    check_weights_file(local, source)
    try:
        return torch.load(local, map_location="cpu", weights_only=not allow_unsafe)
    except READ_ERRORS as e:
        found = None if allow_unsafe else _TORCH_REFUSAL.search(str(e))
        if isinstance(e, pickle.UnpicklingError) and found:
            raise _refuse(path, next(g for g in found.groups() if g).rstrip(".,")) from None
        raise unreadable_file_error(local, source, e) from None


def load_checkpoint_file(path: str, *, allow_unsafe: bool = False, source: str = "") -> Any:
    """Load a ``.pkl`` with :func:`load_pickle_file`, anything else with :func:`load_torch_file`."""
    load = load_pickle_file if path.endswith(".pkl") else load_torch_file
    return load(path, allow_unsafe=allow_unsafe, source=source)
