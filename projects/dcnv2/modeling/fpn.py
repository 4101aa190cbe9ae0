"""FPN on top of the deformable ResNet, as detectron2's ``build_resnet_fpn_backbone`` (R-CNN)
and ``build_retinanet_resnet_fpn_backbone`` (RetinaNet)."""

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7

from .resnet import build_dcnv2_resnet_backbone

__all__ = ["build_dcnv2_resnet_fpn_backbone", "build_dcnv2_retinanet_resnet_fpn_backbone"]


@BACKBONE_REGISTRY.register()
def build_dcnv2_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """Deformable ResNet + FPN (P2-P6, P6 by max-pooling P5) from ``MODEL.RESNETS`` and
    ``MODEL.FPN``."""
    return FPN(
        bottom_up=build_dcnv2_resnet_backbone(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_dcnv2_retinanet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """Deformable ResNet + FPN for RetinaNet (P3-P7; P6, P7 by strided convs on res5), as
    detectron2's ``build_retinanet_resnet_fpn_backbone``."""
    bottom_up = build_dcnv2_resnet_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(
            bottom_up.output_shape()["res5"].channels, out_channels, in_feature="res5"
        ),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
