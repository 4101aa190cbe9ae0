# Mask R-CNN, ResNet-50 with modulated deformable convolution (DCNv2, mdconv) in every 3x3 conv
# of c3-c5, FPN, 1x schedule, COCO 2017 (LazyConfig of ../mask_rcnn_R50_mdconv_FPN_1x.yaml).
# Expected: 41.5 box AP / 37.1 mask AP on COCO val2017 (MMDetection configs/dcnv2/README.md,
# mask_rcnn_r50_fpn_mdconv_c3-c5_1x_coco).
# Train: python train_net.py --config-file configs/lazy/mask_rcnn_R50_mdconv_FPN_1x.py --num-gpus 8
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from dcnv2.data.mapper import DatasetMapper
from dcnv2.data.resumable import build_resumable_train_loader
from dcnv2.data.test_loader import build_checked_test_loader
from dcnv2.data.validation import load_training_dicts
from dcnv2.engine.solver import offset_lr_factor_func
from dcnv2.modeling import make_dcnv2_stages

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
optimizer = model_zoo.get_config("common/optim.py").SGD
lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_1x
train = model_zoo.get_config("common/train.py").train
train.seed = -1  # of the data stream and the random draws; -1: a random one, saved in checkpoints
# Bad annotation entries or unreadable images: "fail" (stop, naming them) or "skip" (warn, go on).
train.on_bad_data = "fail"

# detectron2's COCO loaders with dcnv2's pieces (same arguments): a training stream that resumes
# exactly, images read without silent damage, bad data named or skipped.
dataloader.train._target_ = build_resumable_train_loader
dataloader.train.update(seed="${train.seed}", on_bad_data="${train.on_bad_data}")
dataloader.train.dataset._target_ = load_training_dicts
dataloader.train.dataset.update(
    mode="${train.on_bad_data}", mask_on="${..mapper.use_instance_mask}"
)
dataloader.train.mapper._target_ = DatasetMapper
dataloader.test._target_ = build_checked_test_loader
dataloader.test.update(dataset_name="${.dataset.names}", mode="${train.on_bad_data}")
dataloader.test.mapper._target_ = DatasetMapper

# detectron2's ResNet with deformable 3x3 convs in res3-res5 (same stem, names and init).
model.backbone.bottom_up.stages = L(make_dcnv2_stages)(
    depth=50,
    deform_on_per_stage=[False, True, True, True],  # res2..res5
    deform_modulated=True,
    deform_num_groups=1,
    stride_in_1x1=True,  # MSRA (caffe2) weights
    norm="FrozenBN",
    backend="auto",
)
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"

# Offset/mask convs at OFFSET_LR_MULTIPLIER x the base lr (1.0 as in the YAML recipes; the
# DCNv2 paper's recipe uses 0.1): see dcnv2.engine.solver.
optimizer.params.base_lr = "${..lr}"
optimizer.params.lr_factor_func = L(offset_lr_factor_func)(multiplier=1.0)
