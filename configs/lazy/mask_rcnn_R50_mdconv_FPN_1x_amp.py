# Mask R-CNN, ResNet-50 with mdconv (DCNv2) in c3-c5, FPN, 1x schedule, COCO 2017, trained in
# mixed precision: float16 autocast with dynamic loss scaling on CUDA (detectron2's AMPTrainer),
# bfloat16 autocast on CPU (dcnv2.engine.amp). The deformable op runs in float32 under autocast.
# LazyConfig of ../mask_rcnn_R50_mdconv_FPN_1x_amp.yaml.
# Expected: 42.0 box AP / 37.6 mask AP on COCO val2017 (MMDetection configs/dcnv2/README.md,
# mask_rcnn_r50_fpn_fp16_mdconv_c3-c5_1x_coco, R-50-FPN (FP16)); 41.5 / 37.1 in float32.
# ruff: noqa: F401  (names imported from the parent recipe are this config's keys)
from .mask_rcnn_R50_mdconv_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

train.amp.enabled = True
