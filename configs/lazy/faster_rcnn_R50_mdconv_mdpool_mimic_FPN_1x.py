# Faster R-CNN R50-FPN 1x with the DCNv2 paper's full recipe: mdconv in c3-c5, mdpool in the box
# head, and R-CNN feature mimicking (arXiv 1811.11168, section 3.3), training only.
# LazyConfig of ../faster_rcnn_R50_mdconv_mdpool_mimic_FPN_1x.yaml (see it for the recipe and
# what to expect: about +1 to +1.4 AP from mimicking in the paper's own setting; not reproduced
# here). Inference is the plain mdconv + mdpool detector (dcnv2.modeling.mimic).
# ruff: noqa: F401  (names imported from the parent recipe are this config's keys)
from detectron2.config import LazyCall as L

from dcnv2.modeling.mimic import MimicGeneralizedRCNN, MimicROIHeads, RCNNMimicBranch

from .faster_rcnn_R50_mdconv_mdpool_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

# The meta-architecture gives the heads its backbone, which the branch runs its crops through.
model._target_ = MimicGeneralizedRCNN
model.roi_heads._target_ = MimicROIHeads  # the standard heads + the mimicking branch
model.roi_heads.mimic = L(RCNNMimicBranch)(
    feature_dim=1024,  # the 2fc box head's output
    num_classes="${..num_classes}",
    num_positives_per_image=32,
    crop_size=224,
    loss_weight=0.1,
    cls_loss_weight=0.1,
    box_head=None,  # share the detector's box head fcs (MODEL.DCNV2.MIMIC.SHARE_HEAD_FCS)
    detach_teacher=True,
)
