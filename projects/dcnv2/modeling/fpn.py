"""FPN on top of the deformable ResNet (R-CNN and RetinaNet), and :func:`fpn_outputs`."""

from typing import Dict, Sequence

import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from torch import Tensor, nn

from .resnet import build_dcnv2_resnet_backbone

__all__ = [
    "build_dcnv2_resnet_fpn_backbone",
    "build_dcnv2_retinanet_resnet_fpn_backbone",
    "fpn_outputs",
]


def fpn_outputs(backbone: nn.Module, x: Tensor, names: Sequence[str]) -> Dict[str, Tensor]:
    """The outputs ``names`` (e.g. ``["p4"]``) of ``backbone(x)``, running only what they need."""
    # The outputs of the lateral levels, finest first (the top block's come after them).
    levels = (
        backbone._out_features[: len(backbone.in_features)] if isinstance(backbone, FPN) else []
    )
    if not set(names) <= set(levels):
        out = backbone(x)
        return {name: out[name] for name in names}
    bottom_up = backbone.bottom_up(x)
    finest = min(levels.index(name) for name in names)
    results = {}
    # lateral_convs and output_convs are ordered from the coarsest level down, as in_features up.
    prev = backbone.lateral_convs[0](bottom_up[backbone.in_features[-1]])
    for idx in range(len(levels) - finest):
        level = len(levels) - 1 - idx
        if idx > 0:
            top_down = F.interpolate(prev, scale_factor=2.0, mode="nearest")
            prev = backbone.lateral_convs[idx](bottom_up[backbone.in_features[level]]) + top_down
            if backbone._fuse_type == "avg":
                prev /= 2
        if levels[level] in names:
            results[levels[level]] = backbone.output_convs[idx](prev)
    return {name: results[name] for name in names}


def _resnet_fpn(cfg, input_shape: ShapeSpec, p6p7: bool) -> FPN:
    bottom_up = build_dcnv2_resnet_backbone(cfg, input_shape)
    fpn = cfg.MODEL.FPN
    if p6p7:  # RetinaNet's P6 and P7, from res5
        top_block = LastLevelP6P7(
            bottom_up.output_shape()["res5"].channels, fpn.OUT_CHANNELS, "res5"
        )
    else:
        top_block = LastLevelMaxPool()
    return FPN(bottom_up=bottom_up, in_features=fpn.IN_FEATURES, out_channels=fpn.OUT_CHANNELS,
               norm=fpn.NORM, top_block=top_block, fuse_type=fpn.FUSE_TYPE)  # fmt: skip


@BACKBONE_REGISTRY.register()
def build_dcnv2_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """Deformable ResNet + FPN (P2-P6) from ``MODEL.RESNETS`` and ``MODEL.FPN``."""
    return _resnet_fpn(cfg, input_shape, p6p7=False)


@BACKBONE_REGISTRY.register()
def build_dcnv2_retinanet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """Deformable ResNet + FPN for RetinaNet (P3-P7)."""
    return _resnet_fpn(cfg, input_shape, p6p7=True)
