# Faster R-CNN, ResNet-50 with mdconv (DCNv2) in c3-c5 with 4 deformable groups, FPN, 1x
# schedule, COCO 2017. LazyConfig of ../faster_rcnn_R50_mdconv_group4_FPN_1x.yaml.
# Expected: 41.5 box AP on COCO val2017 (MMDetection configs/dcnv2/README.md,
# faster_rcnn_r50_fpn_mdconv_c3-c5_group4_1x_coco, R-50-FPN (dg=4)).
# ruff: noqa: F401  (names imported from the parent recipe are this config's keys)
from .faster_rcnn_R50_mdconv_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.stages.deform_num_groups = 4
