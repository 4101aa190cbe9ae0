# Faster R-CNN, ResNet-50 with deformable convolution v1 (DCNv1, dconv) in c3-c5, FPN, 1x
# schedule, COCO 2017. LazyConfig of ../faster_rcnn_R50_dconv_FPN_1x.yaml.
# Expected: 41.3 box AP on COCO val2017 (MMDetection configs/dcn/README.md,
# faster_rcnn_r50_fpn_dconv_c3-c5_1x_coco).
# ruff: noqa: F401  (names imported from the parent recipe are this config's keys)
from .faster_rcnn_R50_mdconv_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.stages.deform_modulated = False
