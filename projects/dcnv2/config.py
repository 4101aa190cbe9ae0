"""The project's config keys: ``add_dcnv2_config(cfg)`` adds them, under ``MODEL.DCNV2``.

Which stages are deformable and how is said with detectron2's own keys:
``MODEL.RESNETS.DEFORM_ON_PER_STAGE``, ``DEFORM_MODULATED`` (True: DCNv2) and
``DEFORM_NUM_GROUPS``.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_dcnv2_config"]


def add_dcnv2_config(cfg: CN) -> CN:
    """Add the dcnv2 keys, with defaults that reproduce the seed recipe, to ``cfg`` (in place)."""
    cfg.MODEL.DCNV2 = CN()
    # Deformable-conv implementation: "auto" (best for the device), "detectron2", "native"
    # or "torchvision". See dcnv2.layers.backends.
    cfg.MODEL.DCNV2.BACKEND = "auto"
    return cfg
