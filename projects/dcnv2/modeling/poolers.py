"""Modulated deformable RoI pooling (mdpool) in detectron2's box and mask heads.

``POOLER_TYPE: "ModulatedDeformROIAlign"`` in ``DCNv2StandardROIHeads`` / ``DCNv2CascadeROIHeads``
builds a :class:`DeformableROIPooler`.
"""

from typing import Dict, List, Sequence

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec, nonzero_tuple
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.poolers import (
    ROIPooler,
    assign_boxes_to_levels,
    convert_boxes_to_pooler_format,
)
from detectron2.modeling.roi_heads import CascadeROIHeads, StandardROIHeads
from detectron2.structures import Boxes
from torch import Tensor, nn

from ..layers.mdpool import ModulatedDeformRoIAlign

__all__ = [
    "MDPOOL_TYPE",
    "DeformableROIPooler",
    "build_deformable_pooler",
    "DeformablePoolingMixin",
    "DCNv2StandardROIHeads",
    "DCNv2CascadeROIHeads",
]

MDPOOL_TYPE = "ModulatedDeformROIAlign"


class DeformableROIPooler(ROIPooler):
    """detectron2's multi-level ROIPooler with modulated deformable RoIAlign at every level."""

    def __init__(
        self,
        output_size,
        scales: Sequence[float],
        sampling_ratio: int,
        *,
        in_channels: int,
        gamma: float = 0.1,
        fc_dim: int = 1024,
        num_offset_fc: int = 2,
        num_mask_fc: int = 1,
        share_across_levels: bool = False,
        canonical_box_size: int = 224,
        canonical_level: int = 4,
    ):
        """Args:
        in_channels: channels of every feature map.
        gamma, fc_dim, num_offset_fc, num_mask_fc: see :class:`ModulatedDeformRoIAlign`.
        share_across_levels: one set of branch parameters for all levels, or one per level.
        """
        # ROIAlignV2 only to reuse the parent's checks of the pyramid; replaced below.
        super().__init__(
            output_size,
            scales,
            sampling_ratio,
            "ROIAlignV2",
            canonical_box_size=canonical_box_size,
            canonical_level=canonical_level,
        )
        self.scales = [float(s) for s in scales]
        self.share_across_levels = share_across_levels
        self.level_poolers = nn.ModuleList(
            ModulatedDeformRoIAlign(
                output_size=self.output_size,
                in_channels=in_channels,
                spatial_scale=scale,
                sampling_ratio=sampling_ratio,
                gamma=gamma,
                fc_dim=fc_dim,
                num_offset_fc=num_offset_fc,
                num_mask_fc=num_mask_fc,
                aligned=True,
            )
            for scale in (self.scales[:1] if share_across_levels else self.scales)
        )

    def _pool(self, level: int, features: Tensor, rois: Tensor) -> Tensor:
        pooler = self.level_poolers[0 if self.share_across_levels else level]
        return pooler(features, rois, spatial_scale=self.scales[level])

    def forward(self, x: List[Tensor], box_lists: List[Boxes]) -> Tensor:
        """Args:
            x (list[Tensor]): one (N, C, H_l, W_l) map per level, in the order of ``scales``.
            box_lists (list[Boxes]): N lists of boxes in image coordinates.

        Returns:
            Tensor: (M, C, Ph, Pw), M the total number of boxes, in the order of ``box_lists``.
        """
        if not isinstance(x, list) or not isinstance(box_lists, list):
            raise TypeError(
                "DeformableROIPooler expects a list of feature maps and a list of Boxes"
            )
        if len(x) != len(self.scales):
            raise ValueError(f"expected {len(self.scales)} feature maps, got {len(x)}")
        if len(box_lists) != x[0].shape[0]:
            raise ValueError(f"{len(box_lists)} box lists for a batch of {x[0].shape[0]} images")
        channels = x[0].shape[1]
        if len(box_lists) == 0:
            return x[0].new_zeros((0, channels) + tuple(self.output_size))
        rois = convert_boxes_to_pooler_format(box_lists)
        if len(x) == 1:
            return self._pool(0, x[0], rois)
        levels = assign_boxes_to_levels(
            box_lists, self.min_level, self.max_level, self.canonical_box_size, self.canonical_level
        )
        output = x[0].new_zeros((rois.shape[0], channels) + tuple(self.output_size))
        for level, features in enumerate(x):
            inds = nonzero_tuple(levels == level)[0]
            # Also run levels without RoIs, so that every parameter is in the graph (DDP).
            output.index_put_((inds,), self._pool(level, features, rois[inds]))
        return output


def build_deformable_pooler(
    cfg: CfgNode, input_shape: Dict[str, ShapeSpec], head: str
) -> DeformableROIPooler:
    """The mdpool pooler of ``head`` (``"ROI_BOX_HEAD"`` or ``"ROI_MASK_HEAD"``) from the config."""
    in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
    channels = {input_shape[f].channels for f in in_features}
    if len(channels) != 1:
        raise ValueError(f"mdpool needs the same channels on every level, got {channels}")
    head_cfg, mdpool = cfg.MODEL[head], cfg.MODEL.DCNV2.MDPOOL
    return DeformableROIPooler(
        output_size=head_cfg.POOLER_RESOLUTION,
        scales=[1.0 / input_shape[f].stride for f in in_features],
        sampling_ratio=head_cfg.POOLER_SAMPLING_RATIO,
        in_channels=channels.pop(),
        gamma=mdpool.GAMMA,
        fc_dim=mdpool.FC_DIM,
        num_offset_fc=mdpool.NUM_OFFSET_FC,
        num_mask_fc=mdpool.NUM_MASK_FC,
        share_across_levels=mdpool.SHARE_ACROSS_LEVELS,
    )


def _with_plain_pooler(cfg: CfgNode, head: str) -> CfgNode:
    """A copy of ``cfg`` whose ``head`` uses ROIAlignV2, for detectron2's own builders."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL[head].POOLER_TYPE = "ROIAlignV2"
    return cfg


class DeformablePoolingMixin:
    """Gives a ``StandardROIHeads`` subclass mdpool in the box/mask heads (put it first)."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        if cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE != MDPOOL_TYPE:
            return super()._init_box_head(cfg, input_shape)
        ret = super()._init_box_head(_with_plain_pooler(cfg, "ROI_BOX_HEAD"), input_shape)
        ret["box_pooler"] = build_deformable_pooler(cfg, input_shape, "ROI_BOX_HEAD")
        return ret

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        if not cfg.MODEL.MASK_ON or cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE != MDPOOL_TYPE:
            return super()._init_mask_head(cfg, input_shape)
        ret = super()._init_mask_head(_with_plain_pooler(cfg, "ROI_MASK_HEAD"), input_shape)
        ret["mask_pooler"] = build_deformable_pooler(cfg, input_shape, "ROI_MASK_HEAD")
        return ret


@ROI_HEADS_REGISTRY.register()
class DCNv2StandardROIHeads(DeformablePoolingMixin, StandardROIHeads):
    """detectron2's StandardROIHeads with optional mdpool in the box and mask heads."""


@ROI_HEADS_REGISTRY.register()
class DCNv2CascadeROIHeads(DeformablePoolingMixin, CascadeROIHeads):
    """detectron2's CascadeROIHeads with optional mdpool; one pooler serves all stages."""
