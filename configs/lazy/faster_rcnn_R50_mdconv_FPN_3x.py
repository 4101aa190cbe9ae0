# Faster R-CNN, ResNet-50 with mdconv (DCNv2) in c3-c5, FPN, 3x schedule (270k iterations at 16
# images, LR steps at 210k and 250k), COCO 2017.
# LazyConfig of ../faster_rcnn_R50_mdconv_FPN_3x.yaml.
# Expected: about 42.5-43 box AP; no published number for this exact recipe (detectron2's Mask
# R-CNN R50-FPN with DCNv1 in c3-c5: 42.7 box AP at 3x, 41.5 at 1x, MODEL_ZOO.md).
# ruff: noqa: F401  (names imported from the parent recipe are this config's keys)
from detectron2 import model_zoo

from .faster_rcnn_R50_mdconv_FPN_1x import dataloader, model, optimizer, train

lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_3x
train.max_iter = 270000
