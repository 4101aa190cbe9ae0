"""The project's config keys: ``add_dcnv2_config(cfg)`` adds them, under ``MODEL.DCNV2``.

Which stages are deformable and how is said with detectron2's own keys:
``MODEL.RESNETS.DEFORM_ON_PER_STAGE``, ``DEFORM_MODULATED`` (True: DCNv2) and
``DEFORM_NUM_GROUPS``.
"""

import os
from typing import Optional, Sequence

from detectron2.config import CfgNode as CN

__all__ = ["add_dcnv2_config", "get_cfg"]


def add_dcnv2_config(cfg: CN) -> CN:
    """Add the dcnv2 keys, with defaults that reproduce the seed recipe, to ``cfg`` (in place)."""
    cfg.MODEL.DCNV2 = CN()
    # Deformable-conv implementation: "auto" (best for the device), "detectron2", "native"
    # or "torchvision". See dcnv2.layers.backends.
    cfg.MODEL.DCNV2.BACKEND = "auto"
    return cfg


def get_cfg(config_file: Optional[str] = None, opts: Sequence[str] = ()) -> CN:
    """detectron2's default config with the dcnv2 keys, merged with a YAML file and overrides.

    Args:
        config_file: a YAML config (a path, or a name under ``configs/`` of the package).
        opts: ``["KEY", "VALUE", ...]`` overrides, as on the command line.
    """
    from detectron2.config import get_cfg as d2_get_cfg

    from .model_zoo import get_config_file

    cfg = add_dcnv2_config(d2_get_cfg())
    if config_file:
        if not os.path.isfile(config_file):
            config_file = get_config_file(config_file)
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg
