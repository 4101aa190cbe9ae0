# Faster R-CNN, ResNeXt-101 32x4d with mdconv (DCNv2) in c3-c5, FPN, 1x schedule, COCO 2017.
# LazyConfig of ../faster_rcnn_X101_32x4d_mdconv_FPN_1x.yaml.
# Expected: about 44.5 box AP; no published number for this exact recipe (MMDetection's DCNv1
# faster_rcnn_x101_32x4d_fpn_dconv_c3-c5_1x_coco: 44.5).
# Initialisation: no ImageNet ResNeXt-101 32x4d ships with detectron2 or torchvision. Convert a
# PyTorch-style one (e.g. mmcv's open-mmlab://resnext101_32x4d, as MMDetection uses) with
# detectron2's tools/convert-torchvision-to-d2.py and set train.init_checkpoint; the placeholder
# fails loudly instead of training from scratch. The overrides match that PyTorch-style init.
# ruff: noqa: F401  (names imported from the parent recipe are this config's keys)
from .faster_rcnn_R50_mdconv_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.stages.update(
    depth=101, num_groups=32, width_per_group=4, stride_in_1x1=False
)
model.pixel_mean = [123.675, 116.28, 103.53]  # RGB, 0-255
model.pixel_std = [58.395, 57.12, 57.375]
model.input_format = "RGB"
dataloader.train.mapper.image_format = "RGB"  # the test mapper follows the train one
train.init_checkpoint = "path/to/X-101-32x4d.pkl"
