# Mask R-CNN, ResNet-50 with mdconv (DCNv2) in c3-c5, FPN, 1x schedule, COCO 2017, with modulated
# deformable RoI pooling (mdpool) in the box head; the mask head keeps ROIAlignV2 (see the YAML
# twin, ../mask_rcnn_R50_mdconv_mdpool_FPN_1x.yaml, for why and for the expected AP: no
# published number for this recipe, about 42 box / 37-37.5 mask AP estimated, not measured).
# ruff: noqa: F401  (names imported from the parent recipe are this config's keys)
from .faster_rcnn_R50_mdconv_mdpool_FPN_1x import model as _mdpool
from .mask_rcnn_R50_mdconv_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

model.roi_heads.box_pooler = _mdpool.roi_heads.box_pooler
