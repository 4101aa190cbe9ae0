"""LazyConfig (``.py``) support: loading dcnv2's configs and detectron2's common config pieces.

``get_detectron2_config(name)`` is ``detectron2.model_zoo.get_config(name)`` for the configs that
ship inside the detectron2 package (``common/models/mask_rcnn_fpn.py``, ``common/optim.py``,
...). It exists because ``import detectron2.model_zoo`` needs ``pkg_resources``, which
setuptools removed in version 81, so the model-zoo module fails to import in current
environments while the config files themselves are still installed.
"""

import inspect
import os
from typing import Any, List, Optional, Sequence

import detectron2
from detectron2.config import LazyConfig
from omegaconf import OmegaConf

from .errors import ConfigError

__all__ = ["OPTIONAL_KEYS", "check_override_keys", "is_lazy_config", "get_detectron2_config",
           "load_config"]  # fmt: skip

# Keys dcnv2 reads from a LazyConfig when they are set, which the shipped configs may leave out.
OPTIONAL_KEYS = (
    "train.seed",
    "train.max_nonfinite_skips",
    "train.allow_unsafe_weights",
    "dataloader.coco_datasets",
)

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
    cfg = LazyConfig.load(config_file)
    return LazyConfig.apply_overrides(cfg, check_override_keys(cfg, opts))


def _target_accepts(target: Any, name: str) -> bool:
    """Whether the callable ``_target_`` of a LazyCall node takes an argument ``name`` (a
    constructor argument the config leaves at its default)."""
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        try:
            target = locate(target)
        except Exception:  # an unimportable target fails in instantiate, with its own message
            return True
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _known(cfg, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    if not OmegaConf.is_config(node):
        return False
    if OmegaConf.is_list(node):
        return leaf.isdigit() and int(leaf) < len(node)
    if leaf in node:
        return True
    target = node.get("_target_", None)
    return target is not None and _target_accepts(target, leaf)


def _all_keys(node, prefix: str = "") -> List[str]:
    keys = []
    if not OmegaConf.is_dict(node):
        return keys
    for k in node.keys():
        full = f"{prefix}{k}"
        keys.append(full)
        try:
            value = node[k]
        except Exception:  # an interpolation that does not resolve yet
            continue
        if OmegaConf.is_dict(value):
            keys += _all_keys(value, full + ".")
    return keys


def check_override_keys(cfg, opts: Sequence[str], source: Optional[str] = None) -> List[str]:
    """Refuse ``key=value`` overrides of keys the LazyConfig does not have, as YAML configs do.

    A key is known when the config has it, when it is an argument of the callable of the
    ``LazyCall`` node above it (a constructor argument left at its default), or when it is one
    of :data:`OPTIONAL_KEYS`. ``+key=value`` adds a new key on purpose (Hydra's syntax).

    Returns:
        The overrides to apply (``+`` removed).

    Raises:
        ConfigError: an unknown key, naming the closest valid ones; an override without ``=``.
    """
    from .config import closest_keys

    source = source or "the command line"
    out = []
    for opt in opts:
        key, sep, value = opt.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"Bad LazyConfig override {opt!r} on {source}: expected key=value, e.g. "
                "train.max_iter=1000"
            )
        if key.startswith("+"):
            out.append(f"{key[1:]}={value}")
            continue
        if key not in OPTIONAL_KEYS and not _known(cfg, key):
            close = closest_keys(key, _all_keys(cfg) + list(OPTIONAL_KEYS), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(
                f"Unknown config key {key} in {opt!r} on {source}{hint} (+{key}=... adds a new "
                "key on purpose)"
            )
        out.append(opt)
    return out
