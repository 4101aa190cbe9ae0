"""R-CNN feature mimicking (DCNv2 paper, section 3.3): a training-only R-CNN branch.

Positive RoIs are cropped, resized, run through the same backbone and box head; ``loss_mimic`` is
``1 - cos`` to the Faster R-CNN RoI features. At inference the heads are exactly their base class.
"""

import copy
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, ROI_HEADS_REGISTRY, GeneralizedRCNN
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn
from torchvision.ops import roi_align

from .fpn import fpn_outputs
from .poolers import DCNv2StandardROIHeads

__all__ = [
    "crop_and_resize",
    "sample_positives",
    "cosine_mimic_loss",
    "RCNNMimicBranch",
    "MimicROIHeads",
    "MimicGeneralizedRCNN",
]


def crop_and_resize(
    images: Tensor, boxes: Sequence[Tensor], size: int, sampling_ratio: int = 2
) -> Tensor:
    """Crop boxes from a batch of images and resize each crop to ``size x size`` (aligned RoIAlign).

    Args:
        images (Tensor): (N, C, H, W).
        boxes (list[Tensor]): N tensors of shape (R_i, 4), XYXY in image pixels.

    Returns:
        Tensor: (sum R_i, C, size, size), crops in the order of ``boxes``.
    """
    if len(boxes) != images.shape[0]:
        raise ValueError(f"got {len(boxes)} box lists for a batch of {images.shape[0]} images")
    boxes = [b.to(images.dtype) for b in boxes]
    return roi_align(images, boxes, (size, size), 1.0, sampling_ratio, aligned=True)


def sample_positives(
    gt_classes: Sequence[Tensor], num_classes: int, max_per_image: int
) -> List[Tensor]:
    """Indices of up to ``max_per_image`` random foreground RoIs per image.

    Args:
        gt_classes (list[Tensor]): per image, (R_i,); ``num_classes`` is background, -1 ignored.

    Returns:
        list[Tensor]: per image, (P_i,) int64 indices into that image's RoIs.
    """
    if max_per_image < 0:
        raise ValueError(f"max_per_image must be >= 0, got {max_per_image}")
    out = []
    for labels in gt_classes:
        fg = torch.nonzero((labels >= 0) & (labels < num_classes)).squeeze(1)
        if fg.numel() > max_per_image:
            fg = fg[torch.randperm(fg.numel(), device=fg.device)[:max_per_image]]
        out.append(fg)
    return out


def cosine_mimic_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over RoIs of ``1 - cos(student, teacher)``, for (R, D) features; a scalar in [0, 2]."""
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(
            f"expected two (R, D) feature tensors of the same shape, got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    return (1.0 - F.cosine_similarity(student, teacher, dim=1)).mean()


class RCNNMimicBranch(nn.Module):
    """The R-CNN branch's own parameters (classifier, optionally its own fcs) and its losses.

    What it shares with the detector is passed to :meth:`losses`, so nothing is registered twice.
    """

    def __init__(
        self,
        *,
        feature_dim: int,
        num_classes: int,
        num_positives_per_image: int = 32,
        crop_size: int = 224,
        loss_weight: float = 0.1,
        cls_loss_weight: float = 0.1,
        box_head: Optional[nn.Module] = None,
        detach_teacher: bool = True,
        sampling_ratio: int = 2,
    ):
        """Args:
        num_classes: foreground classes (no background logit: only positive RoIs reach it).
        num_positives_per_image: cap on sampled positive RoIs per image (paper: 32).
        crop_size: side of the resized crops (paper: 224).
        loss_weight: weight of ``loss_mimic`` (paper: 0.1).
        box_head: the branch's own fcs; None shares the detector's box head.
        detach_teacher: stop the mimic gradient at the R-CNN features (they are the target).
        """
        super().__init__()
        if crop_size <= 0 or num_positives_per_image < 0:
            raise ValueError(
                f"crop_size must be > 0 and num_positives_per_image >= 0, got {crop_size} and "
                f"{num_positives_per_image}"
            )
        self.num_classes = num_classes
        self.num_positives_per_image = num_positives_per_image
        self.crop_size = crop_size
        self.loss_weight = loss_weight
        self.cls_loss_weight = cls_loss_weight
        self.detach_teacher = detach_teacher
        self.sampling_ratio = sampling_ratio
        self.box_head = box_head
        self.cls_score = nn.Linear(feature_dim, num_classes)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.constant_(self.cls_score.bias, 0)

    def losses(
        self,
        *,
        images: Tensor,
        features: Sequence[Tensor],
        proposals: Sequence[Instances],
        backbone: nn.Module,
        box_pooler: nn.Module,
        box_head: nn.Module,
        in_features: Sequence[str],
    ) -> Dict[str, Tensor]:
        """The two losses for one batch.

        Args:
            images (Tensor): (N, 3, H, W) normalised, padded images (``ImageList.tensor``).
            proposals (list[Instances]): proposals with ``proposal_boxes``, ``gt_classes``.
            box_pooler: the heads' pooler, ``(list[Tensor], list[Boxes]) -> (R, C, k, k)``.

        Returns:
            dict: ``loss_mimic`` and ``loss_rcnn_cls``, weighted scalars.
        """
        keep = sample_positives(
            [p.gt_classes for p in proposals], self.num_classes, self.num_positives_per_image
        )
        boxes = [p.proposal_boxes.tensor[k] for p, k in zip(proposals, keep)]
        labels = torch.cat([p.gt_classes[k] for p, k in zip(proposals, keep)])
        if labels.numel() == 0:
            # No positive RoI in the batch: zero losses that still touch every parameter of the
            # branch, so DDP (find_unused_parameters=False) sees a gradient for all of them.
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            return {"loss_mimic": zero, "loss_rcnn_cls": zero.clone()}

        frcnn = box_head(box_pooler(list(features), [Boxes(b) for b in boxes]))

        crops = crop_and_resize(images, boxes, self.crop_size, self.sampling_ratio)
        whole = Boxes(crops.new_tensor([[0.0, 0.0, self.crop_size, self.crop_size]]))
        maps = self._crop_maps(crops, backbone, box_pooler, in_features)
        pooled = box_pooler(maps, [whole] * len(crops))
        rcnn = (self.box_head if self.box_head is not None else box_head)(pooled)

        teacher = rcnn.detach() if self.detach_teacher else rcnn
        mimic = cosine_mimic_loss(frcnn.flatten(1), teacher.flatten(1))
        cls = F.cross_entropy(self.cls_score(rcnn.flatten(1)), labels)
        return {"loss_mimic": self.loss_weight * mimic, "loss_rcnn_cls": self.cls_loss_weight * cls}

    def _crop_maps(
        self, crops: Tensor, backbone: nn.Module, box_pooler: nn.Module, in_features: Sequence[str]
    ) -> List[Tensor]:
        """The maps ``in_features`` of the crops; levels the crops never sample are zeros."""
        if len(in_features) > 1 and not isinstance(box_pooler, ROIPooler):
            maps = fpn_outputs(backbone, crops, in_features)
            return [maps[f] for f in in_features]
        level = 0
        if len(in_features) > 1:  # the level the pooler picks for the crops' boxes (p4 for 224)
            whole = Boxes(crops.new_tensor([[0.0, 0.0, self.crop_size, self.crop_size]]))
            p = box_pooler
            levels = assign_boxes_to_levels(
                [whole], p.min_level, p.max_level, p.canonical_box_size, p.canonical_level
            )
            level = int(levels[0])
        used = fpn_outputs(backbone, crops, [in_features[level]])[in_features[level]]
        placeholder = used.new_zeros(used.shape[:2] + (1, 1))
        return [used if i == level else placeholder for i in range(len(in_features))]


@ROI_HEADS_REGISTRY.register()
class MimicROIHeads(DCNv2StandardROIHeads):
    """``DCNv2StandardROIHeads`` with the training-only R-CNN feature-mimicking branch.

    With ``MODEL.DCNV2.MIMIC.ENABLED`` the heads need the backbone: build them inside
    :class:`MimicGeneralizedRCNN`.
    """

    @configurable
    def __init__(self, *, mimic: Optional[RCNNMimicBranch] = None, **kwargs):
        """Args:
        mimic: the branch, or None for the plain heads.
        """
        super().__init__(**kwargs)
        self.mimic = mimic
        # The backbone belongs to the meta-architecture; a tuple keeps it out of this module's
        # children so that its parameters are not registered (and saved) a second time.
        self._backbone: tuple = ()

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        mc = cfg.MODEL.DCNV2.MIMIC
        if mc.ENABLED:
            out_shape = ret["box_head"].output_shape
            feature_dim = out_shape.channels * (out_shape.height or 1) * (out_shape.width or 1)
            ret["mimic"] = RCNNMimicBranch(
                feature_dim=feature_dim,
                num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES,
                num_positives_per_image=mc.NUM_POSITIVES_PER_IMAGE,
                crop_size=mc.CROP_SIZE,
                loss_weight=mc.LOSS_WEIGHT,
                cls_loss_weight=mc.CLS_LOSS_WEIGHT,
                box_head=None if mc.SHARE_HEAD_FCS else copy.deepcopy(ret["box_head"]),
                detach_teacher=mc.DETACH_RCNN_FEATURES,
            )
        return ret

    def attach_backbone(self, backbone: nn.Module) -> None:
        """Give the heads the backbone the R-CNN branch runs its crops through."""
        size_div = getattr(backbone, "size_divisibility", 0) or 1
        if self.mimic is not None and self.mimic.crop_size % size_div:
            raise ValueError(
                f"MODEL.DCNV2.MIMIC.CROP_SIZE={self.mimic.crop_size} must be a multiple of the "
                f"backbone's size_divisibility ({size_div})"
            )
        self._backbone = (backbone,)

    def forward(self, images: ImageList, features: Dict[str, Tensor], proposals, targets=None):
        """The base heads' forward; in training also the R-CNN branch's losses."""
        out, losses = super().forward(images, features, proposals, targets)
        if self.training and self.mimic is not None:
            if not self._backbone:
                raise RuntimeError(
                    "MODEL.DCNV2.MIMIC.ENABLED needs the MODEL.META_ARCHITECTURE "
                    "'MimicGeneralizedRCNN' (it calls attach_backbone(backbone))"
                )
            losses.update(
                self.mimic.losses(
                    images=images.tensor,
                    features=[features[f] for f in self.box_in_features],
                    proposals=out,
                    backbone=self._backbone[0],
                    box_pooler=self.box_pooler,
                    box_head=self.box_head,
                    in_features=self.box_in_features,
                )
            )
        return out, losses


@META_ARCH_REGISTRY.register()
class MimicGeneralizedRCNN(GeneralizedRCNN):
    """``GeneralizedRCNN`` whose ROI heads get its backbone (for the R-CNN mimicking branch)."""

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(self.roi_heads, MimicROIHeads):
            raise TypeError(
                "MimicGeneralizedRCNN needs ROI heads with the mimicking branch "
                f"(e.g. MODEL.ROI_HEADS.NAME 'MimicROIHeads'), got {type(self.roi_heads).__name__}"
            )
        self.roi_heads.attach_backbone(self.backbone)
