"""dcnv2: Deformable ConvNets v2 for detectron2.

``import dcnv2`` registers the backbones (``build_dcnv2_resnet_backbone``,
``build_dcnv2_resnet_fpn_backbone``), ROI heads and the synthetic datasets in detectron2's
registries: at once when detectron2's ``modeling`` / ``data`` are imported already, else right
after they are (:mod:`dcnv2.imports`). The package itself imports neither torch nor detectron2,
so light submodules (``dcnv2.errors``, ``dcnv2.tools.cli``) load at once; the public names
below load their modules on first use (PEP 562).

Without detectron2, the import raises :class:`dcnv2.errors.DependencyMissingError` (an
``ImportError``) saying how to install it.
"""

import importlib
import importlib.util

from . import imports
from .errors import detectron2_missing

try:
    if importlib.util.find_spec("detectron2") is None:
        raise ModuleNotFoundError("No module named 'detectron2'", name="detectron2")
except ImportError as e:
    raise detectron2_missing(e) from None

imports.install()

__version__ = "0.1.0"
__all__ = ["add_dcnv2_config", "get_cfg", "get_config_file", "list_config_files"]

_PUBLIC = {
    "add_dcnv2_config": "config",
    "get_cfg": "config",
    "get_config_file": "model_zoo",
    "list_config_files": "model_zoo",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: dcnv2.data
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
