"""Models: importing this module registers the backbones in detectron2's BACKBONE_REGISTRY."""

from .fpn import build_dcnv2_resnet_fpn_backbone, build_dcnv2_retinanet_resnet_fpn_backbone
from .mimic import MimicGeneralizedRCNN, MimicROIHeads  # registers them
from .poolers import (  # registers the ROI heads
    DCNv2CascadeROIHeads,
    DCNv2StandardROIHeads,
    DeformablePoolingMixin,
    DeformableROIPooler,
)
from .resnet import DCNv2BottleneckBlock, build_dcnv2_resnet_backbone, make_dcnv2_stages

__all__ = [
    "DCNv2BottleneckBlock",
    "make_dcnv2_stages",
    "build_dcnv2_resnet_backbone",
    "build_dcnv2_resnet_fpn_backbone",
    "build_dcnv2_retinanet_resnet_fpn_backbone",
    "MimicROIHeads",
    "MimicGeneralizedRCNN",
    "DeformableROIPooler",
    "DeformablePoolingMixin",
    "DCNv2StandardROIHeads",
    "DCNv2CascadeROIHeads",
]
