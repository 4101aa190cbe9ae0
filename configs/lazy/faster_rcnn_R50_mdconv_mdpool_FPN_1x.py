# Faster R-CNN, ResNet-50 with mdconv (DCNv2) in c3-c5 and modulated deformable RoI pooling
# (mdpool, one set of branch weights per FPN level) in the box head, FPN, 1x schedule, COCO
# 2017: the DCNv2 paper's full "DCNv2 modeling".
# LazyConfig of ../faster_rcnn_R50_mdconv_mdpool_FPN_1x.yaml.
# Expected: no published number for this FPN 1x recipe; the paper (arXiv 1811.11168, Table 1)
# reports 41.7 box AP for Faster R-CNN ResNet-50 in its own setting. Estimate: about 41.5-42.5,
# not measured here.
# ruff: noqa: F401  (names imported from the parent recipe are this config's keys)
from detectron2.config import LazyCall as L

from dcnv2.modeling import DeformableROIPooler

from .faster_rcnn_R50_mdconv_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

# Defaults of mmcv's ModulatedDeformRoIPoolPack (MODEL.DCNV2.MDPOOL in the YAML recipes).
model.roi_heads.box_pooler = L(DeformableROIPooler)(
    output_size=7,
    scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32),
    sampling_ratio=0,
    in_channels=256,
    gamma=0.1,
    fc_dim=1024,
    num_offset_fc=2,
    num_mask_fc=1,
    share_across_levels=False,
)
