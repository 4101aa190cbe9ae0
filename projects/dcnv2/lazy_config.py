"""LazyConfig (``.py``) support: loading dcnv2's configs and detectron2's common config pieces.

``get_detectron2_config(name)`` is ``detectron2.model_zoo.get_config(name)`` for the configs that
ship inside the detectron2 package (``common/models/mask_rcnn_fpn.py``, ``common/optim.py``,
...). It exists because ``import detectron2.model_zoo`` needs ``pkg_resources``, which
setuptools removed in version 81, so the model-zoo module fails to import in current
environments while the config files themselves are still installed.
"""

import os
from typing import Sequence

import detectron2
from detectron2.config import LazyConfig

__all__ = ["is_lazy_config", "get_detectron2_config", "load_config"]

_D2_CONFIG_ROOT = os.path.join(os.path.dirname(detectron2.__file__), "model_zoo", "configs")


def is_lazy_config(config_file: str) -> bool:
    """True for a LazyConfig (Python) file, False for a YAML config."""
    return config_file.endswith(".py")


def get_detectron2_config(name: str):
    """A LazyConfig shipped with detectron2, as ``detectron2.model_zoo.get_config(name)``.

    Args:
        name: path under detectron2's ``model_zoo/configs``, e.g. ``"common/train.py"``.

    Returns:
        omegaconf.DictConfig: a fresh copy each call, safe to modify.
    """
    path = os.path.join(_D2_CONFIG_ROOT, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"detectron2 {detectron2.__version__} ships no config {name!r} (looked for {path}); "
            f"expected a path under {_D2_CONFIG_ROOT}, e.g. 'common/models/mask_rcnn_fpn.py'"
        )
    return LazyConfig.load(path)


def load_config(config_file: str, opts: Sequence[str] = ()):
    """Load a LazyConfig file and apply ``key=value`` overrides.

    Args:
        config_file: a ``.py`` config: a path, or a name under the package's ``configs/``
            (``"lazy/mask_rcnn_R50_mdconv_FPN_1x.py"``).
        opts: overrides such as ``["train.max_iter=10", "train.device=cpu"]``.
    """
    from .model_zoo import resolve_config_file

    if not is_lazy_config(config_file):
        raise ValueError(f"{config_file!r} is not a LazyConfig file: expected a .py file")
    config_file = resolve_config_file(config_file)
    return LazyConfig.apply_overrides(LazyConfig.load(config_file), list(opts))
