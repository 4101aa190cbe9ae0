# Cascade R-CNN (3 stages, IoU 0.5/0.6/0.7, class-agnostic boxes), ResNet-50 with mdconv (DCNv2)
# in c3-c5, FPN, 1x schedule, COCO 2017. LazyConfig of ../cascade_rcnn_R50_mdconv_FPN_1x.yaml.
# Expected: about 43.8 box AP; no published number for this exact recipe (MMDetection's DCNv1
# cascade_rcnn_r50_fpn_dconv_c3-c5_1x_coco: 43.8).
# ruff: noqa: F401  (names imported from the parent recipe are this config's keys)
from .cascade_mask_rcnn_R50_mdconv_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

model.roi_heads.update(mask_in_features=None, mask_pooler=None, mask_head=None)
dataloader.train.mapper.use_instance_mask = False
