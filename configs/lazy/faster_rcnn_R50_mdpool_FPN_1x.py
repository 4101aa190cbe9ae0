# Faster R-CNN, ResNet-50 (no deformable convs), FPN, 1x schedule, COCO 2017, with modulated
# deformable RoI pooling (mdpool) in the box head. LazyConfig of
# ../faster_rcnn_R50_mdpool_FPN_1x.yaml.
# Expected: 38.7 box AP on COCO val2017 (MMDetection configs/dcn/README.md,
# faster_rcnn_r50_fpn_mdpool_1x_coco); not measured here.
# ruff: noqa: F401  (names imported from the parent recipe are this config's keys)
from .faster_rcnn_R50_mdconv_mdpool_FPN_1x import (
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.backbone.bottom_up.stages.deform_on_per_stage = [False, False, False, False]
