"""What ``import dcnv2`` sets up in the import system, so that the package itself imports
neither torch nor detectron2 (``--help`` of every tool answers at once) and still registers its
components before anyone can look them up:

* Registration. dcnv2's backbones and ROI heads (:mod:`dcnv2.modeling`) are registered in
  detectron2's registries, and its synthetic datasets (:mod:`dcnv2.data`) in the
  ``DatasetCatalog``, as soon as ``detectron2.modeling`` (``detectron2.data``) has been imported:
  right away if it already is, else right after its import completes, by whoever imports it.
  A registry cannot be consulted before its module is imported, so ``import dcnv2`` behaves as
  if it had imported the registering modules itself.
* Quiet imports. The two modules whose import prints ``torch.jit.script is deprecated``
  (:mod:`dcnv2.quiet`) are executed with that warning filtered.

Both work through one finder on ``sys.meta_path`` that wraps the loader of the few modules
named here (:data:`AFTER_IMPORT`, :data:`QUIET_IMPORTS`); every other import is untouched.
"""

import importlib
import importlib.abc
import sys
from typing import Dict, Tuple

from .quiet import known_messages_silenced

__all__ = ["AFTER_IMPORT", "QUIET_IMPORTS", "install"]

# detectron2 module -> the dcnv2 modules whose import registers into its registries.
AFTER_IMPORT: Dict[str, Tuple[str, ...]] = {
    "detectron2.modeling": ("dcnv2.modeling",),
    "detectron2.data": ("dcnv2.data",),
}
# Modules that print a known warning (dcnv2.quiet) when imported.
QUIET_IMPORTS = frozenset({"fvcore.nn.focal_loss", "detectron2.modeling.box_regression"})


def _register(names: Tuple[str, ...]) -> None:
    with known_messages_silenced():
        for name in names:
            importlib.import_module(name)


class _WrappedLoader(importlib.abc.Loader):
    """The module's own loader, with its execution silenced and/or followed by registration;
    every other attribute (resources, source) is the original loader's."""

    def __init__(self, loader, name: str):
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        if self._name in QUIET_IMPORTS:
            with known_messages_silenced():
                self._loader.exec_module(module)
        else:
            self._loader.exec_module(module)
        if self._name in AFTER_IMPORT:
            _register(AFTER_IMPORT[self._name])

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in AFTER_IMPORT and fullname not in QUIET_IMPORTS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _WrappedLoader(spec.loader, fullname)
        return spec


def install() -> None:
    """Register what the already imported detectron2 modules need now, and put the finder on
    ``sys.meta_path`` for the others (once per process)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    for module, names in AFTER_IMPORT.items():
        if module in sys.modules:
            _register(names)
