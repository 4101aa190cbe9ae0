# The embedded default as a LazyConfig (twin of faster_rcnn_R50_mdconv_FPN_instant.yaml): the
# seed model trained from scratch on CPU on the synthetic shapes dataset the project generates
# itself (dcnv2.data.synthetic: 96 train / 24 val images, 3 classes), then evaluated. No download.
#   python train_net.py --config-file configs/quick/faster_rcnn_R50_mdconv_FPN_instant.py
# A smoke test of the whole pipeline, not a recipe: nothing here says anything about COCO.
# ruff: noqa: F401  (names imported from the parent recipe are this config's keys)
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils.registry import locate

from ..lazy.faster_rcnn_R50_mdconv_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

# GroupNorm everywhere and every stage trained: nothing is pretrained (see the YAML twin).
model.backbone.bottom_up.freeze_at = 0
model.backbone.bottom_up.stem.norm = "GN"
model.backbone.bottom_up.stages.norm = "GN"
model.backbone.norm = "GN"
model.proposal_generator.anchor_generator.sizes = [[16], [32], [64], [128], [256]]
model.proposal_generator.update(
    batch_size_per_image=64, pre_nms_topk=(200, 200), post_nms_topk=(100, 100)
)
model.roi_heads.update(num_classes=3, batch_size_per_image=64)
model.roi_heads.box_predictor.test_score_thresh = 0.001  # rank every detection (COCO AP)

dataloader.train.dataset.names = "dcnv2_synthetic_train"
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(128,), sample_style="choice", max_size=256),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.update(total_batch_size=4, num_workers=1)
dataloader.test.dataset.names = "dcnv2_synthetic_val"
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=128, max_size=256)
]
dataloader.test.num_workers = 1

# 140 iterations, lr 0.02 after 20 warm-up iterations, x0.1 at 120; SOLVER.CLIP_GRADIENTS.
optimizer.lr = 0.02
optimizer._target_ = L(maybe_add_gradient_clipping)(
    cfg={"SOLVER": {"CLIP_GRADIENTS": {"ENABLED": True, "CLIP_TYPE": "norm", "CLIP_VALUE": 5.0,
                                       "NORM_TYPE": 2.0}}},
    optimizer=L(locate)(name="torch.optim.SGD"),
)  # fmt: skip
lr_multiplier.scheduler.update(values=[1.0, 0.1], milestones=[120, 140])
lr_multiplier.warmup_length = 20 / 140
train.update(
    device="cpu",
    init_checkpoint="",  # random init
    max_iter=140,
    eval_period=0,  # evaluated once, after training
    seed=0,  # same weights init and data order on every run
    output_dir="output/quick/faster_rcnn_R50_mdconv_FPN_instant_lazy",
)
train.checkpointer.period = 100000  # only model_final.pth
