# Mask R-CNN, ResNet-50 with deformable convolution v1 (DCNv1, dconv) in every 3x3 conv of
# c3-c5, FPN, 1x schedule, COCO 2017. LazyConfig of ../mask_rcnn_R50_dconv_FPN_1x.yaml.
# Expected: 41.5 box AP / 37.5 mask AP on COCO val2017 (detectron2 MODEL_ZOO.md, "Deformable
# Conv" 1x, Misc/mask_rcnn_R_50_FPN_1x_dconv_c3-c5). MMDetection's mask_rcnn_r50_fpn_dconv_c3-c5:
# 41.8 / 37.4.
# ruff: noqa: F401  (names imported from the parent recipe are this config's keys)
from .mask_rcnn_R50_mdconv_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.stages.deform_modulated = False
