# RetinaNet, ResNet-50 with mdconv (DCNv2) in c3-c5, FPN (P3-P7), 1x schedule, COCO 2017.
# LazyConfig of ../retinanet_R50_mdconv_FPN_1x.yaml.
# Expected: no published number for a deformable RetinaNet; the plain RetinaNet R50-FPN 1x gives
# 37.4 box AP (detectron2 MODEL_ZOO.md) and mdconv in c3-c5 adds 4.0 to Faster R-CNN in
# MMDetection (41.4 vs 37.4): roughly 40-41 expected, an estimate, not a measurement.
# ruff: noqa: F401  (names imported from the parent recipe are this config's keys)
from detectron2 import model_zoo

from .mask_rcnn_R50_mdconv_FPN_1x import dataloader, lr_multiplier
from .mask_rcnn_R50_mdconv_FPN_1x import model as _mask_rcnn  # "_": not a config key
from .mask_rcnn_R50_mdconv_FPN_1x import optimizer, train

model = model_zoo.get_config("common/models/retinanet.py").model
model.backbone.bottom_up.stages = _mask_rcnn.backbone.bottom_up.stages
dataloader.train.mapper.use_instance_mask = False
optimizer.lr = 0.01  # RetinaNet's, as detectron2's COCO-Detection/retinanet_R_50_FPN_1x.py
