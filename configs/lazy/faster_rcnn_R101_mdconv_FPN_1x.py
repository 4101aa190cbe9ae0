# Faster R-CNN, ResNet-101 with mdconv (DCNv2) in c3-c5, FPN, 1x schedule, COCO 2017.
# LazyConfig of ../faster_rcnn_R101_mdconv_FPN_1x.yaml.
# Expected: about 42.7 box AP or a little more; no published number for this exact recipe
# (MMDetection's R-101 DCNv1 faster_rcnn_r101_fpn_dconv_c3-c5_1x_coco: 42.7).
# ruff: noqa: F401  (names imported from the parent recipe are this config's keys)
from .faster_rcnn_R50_mdconv_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.stages.depth = 101
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-101.pkl"
