# Mask R-CNN R50-FPN 1x with mdconv in c3-c5, mdpool in the box head (the mask head keeps
# ROIAlignV2) and R-CNN feature mimicking on the box head's features, training only.
# LazyConfig of ../mask_rcnn_R50_mdconv_mdpool_mimic_FPN_1x.yaml (see it for what to expect; not
# reproduced here). Inference is the plain Mask R-CNN (dcnv2.modeling.mimic).
# ruff: noqa: F401  (names imported from the parent recipe are this config's keys)
from .faster_rcnn_R50_mdconv_mdpool_mimic_FPN_1x import model as _mimic
from .mask_rcnn_R50_mdconv_mdpool_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

model._target_ = _mimic._target_
model.roi_heads._target_ = _mimic.roi_heads._target_
model.roi_heads.mimic = _mimic.roi_heads.mimic
