# Cascade Mask R-CNN (3 box stages, IoU 0.5/0.6/0.7, class-agnostic boxes), ResNet-50 with
# mdconv (DCNv2) in c3-c5, FPN, 1x schedule, COCO 2017.
# LazyConfig of ../cascade_mask_rcnn_R50_mdconv_FPN_1x.yaml.
# Expected: about 44.4 box AP / 38.6 mask AP; no published number for this exact recipe
# (MMDetection's DCNv1 cascade_mask_rcnn_r50_fpn_dconv_c3-c5_1x_coco: 44.4 / 38.6).
# ruff: noqa: F401  (names imported from the parent recipe are this config's keys)
from detectron2 import model_zoo

from .mask_rcnn_R50_mdconv_FPN_1x import dataloader, lr_multiplier
from .mask_rcnn_R50_mdconv_FPN_1x import model as _mask_rcnn  # "_": not a config key
from .mask_rcnn_R50_mdconv_FPN_1x import optimizer, train

model = model_zoo.get_config("common/models/cascade_rcnn.py").model
model.backbone.bottom_up.stages = _mask_rcnn.backbone.bottom_up.stages
model.proposal_generator.post_nms_topk = (2000, 1000)  # as detectron2's Cascade R-CNN recipes
