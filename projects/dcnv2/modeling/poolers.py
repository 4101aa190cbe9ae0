"""Modulated deformable RoI pooling (mdpool) in detectron2's box and mask heads.

``POOLER_TYPE: "ModulatedDeformROIAlign"`` in ``DCNv2StandardROIHeads`` / ``DCNv2CascadeROIHeads``
builds a :class:`DeformableROIPooler`.
"""

from typing import Dict, Sequence

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import CascadeROIHeads, StandardROIHeads
from torch import Tensor, nn

from ..layers.mdpool import ModulatedDeformRoIAlign

__all__ = [
    "DeformableROIPooler",
    "DeformablePoolingMixin",
    "DCNv2StandardROIHeads",
    "DCNv2CascadeROIHeads",
]

MDPOOL_TYPE = "ModulatedDeformROIAlign"


class _SharedLevel(nn.Module):
    """A pyramid level pooled by the layer of level 0 at this level's scale."""

    def __init__(self, layer: ModulatedDeformRoIAlign, scale: float):
        super().__init__()
        # A tuple, not a child: the shared parameters are saved once, under level 0.
        self.layer, self.scale = (layer,), scale

    def forward(self, features: Tensor, rois: Tensor) -> Tensor:
        return self.layer[0](features, rois, spatial_scale=self.scale)


class DeformableROIPooler(ROIPooler):
    """detectron2's multi-level ROIPooler with modulated deformable RoIAlign at every level."""

    def __init__(
        self,
        output_size,
        scales: Sequence[float],
        sampling_ratio: int,
        *,
        share_across_levels: bool = False,
        canonical_box_size: int = 224,
        canonical_level: int = 4,
        **layer_kwargs,
    ):
        """Args:
        share_across_levels: one set of branch parameters for all levels (saved under level 0),
            or one per level.
        layer_kwargs: ``in_channels`` (of every level) and optionally ``gamma``, ``fc_dim``,
            ``num_offset_fc``, ``num_mask_fc`` of :class:`ModulatedDeformRoIAlign`.
        """
        # ROIAlignV2 only to reuse the parent's checks of the pyramid; replaced below.
        super().__init__(
            output_size, scales, sampling_ratio, "ROIAlignV2", canonical_box_size, canonical_level
        )
        layers = [
            ModulatedDeformRoIAlign(output_size=self.output_size, spatial_scale=scale,
                                    sampling_ratio=sampling_ratio, **layer_kwargs)  # fmt: skip
            for scale in (scales[:1] if share_across_levels else scales)
        ]
        layers += [_SharedLevel(layers[0], scale) for scale in scales[len(layers) :]]
        # detectron2's forward runs every level, even without RoIs: DDP needs every parameter used.
        self.level_poolers = nn.ModuleList(layers)


def _with_mdpool(init, cfg: CfgNode, input_shape: Dict[str, ShapeSpec], head: str, key: str):
    """detectron2's ``init(cfg, input_shape)`` of ``head``, with the mdpool pooler if asked for."""
    head_cfg, mdpool = cfg.MODEL[head], cfg.MODEL.DCNV2.MDPOOL
    if head_cfg.POOLER_TYPE != MDPOOL_TYPE:
        return init(cfg, input_shape)
    plain = cfg.clone()  # detectron2's builders know only their own pooler types
    plain.defrost()
    plain.MODEL[head].POOLER_TYPE = "ROIAlignV2"
    ret = init(plain, input_shape)
    if key not in ret:  # no mask head without MODEL.MASK_ON
        return ret
    in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
    channels = {input_shape[f].channels for f in in_features}
    if len(channels) != 1:
        raise ValueError(f"mdpool needs the same channels on every level, got {channels}")
    ret[key] = DeformableROIPooler(
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
    return ret


class DeformablePoolingMixin:
    """Gives a ``StandardROIHeads`` subclass mdpool in the box/mask heads (put it first)."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        return _with_mdpool(super()._init_box_head, cfg, input_shape, "ROI_BOX_HEAD", "box_pooler")

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        init = super()._init_mask_head
        return _with_mdpool(init, cfg, input_shape, "ROI_MASK_HEAD", "mask_pooler")


@ROI_HEADS_REGISTRY.register()
class DCNv2StandardROIHeads(DeformablePoolingMixin, StandardROIHeads):
    """detectron2's StandardROIHeads with optional mdpool in the box and mask heads."""


@ROI_HEADS_REGISTRY.register()
class DCNv2CascadeROIHeads(DeformablePoolingMixin, CascadeROIHeads):
    """detectron2's CascadeROIHeads with optional mdpool; one pooler serves all stages."""
