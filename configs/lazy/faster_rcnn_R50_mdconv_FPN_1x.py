# Faster R-CNN, ResNet-50 with modulated deformable convolution (DCNv2, mdconv) in every 3x3
# conv of c3-c5 (13 layers), FPN, 1x schedule, COCO 2017.
# LazyConfig of ../faster_rcnn_R50_mdconv_FPN_1x.yaml: the Mask R-CNN recipe without mask head.
# Expected: 41.4 box AP on COCO val2017 (MMDetection configs/dcnv2/README.md,
# faster_rcnn_r50_fpn_mdconv_c3-c5_1x_coco).
# ruff: noqa: F401  (names imported from the parent recipe are this config's keys)
from .mask_rcnn_R50_mdconv_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

model.roi_heads.update(mask_in_features=None, mask_pooler=None, mask_head=None)
dataloader.train.mapper.use_instance_mask = False
