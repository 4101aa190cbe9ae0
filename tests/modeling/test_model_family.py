"""The model family: every YAML and LazyConfig recipe builds, trains one step and infers on CPU
(R101/X101: build and infer); YAML and LazyConfig twins compute the same function; mixed
precision on CPU through both training loops; the offset learning-rate multiplier."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer as d2_build_optimizer
from detectron2.structures import Boxes, BoxMode, Instances, PolygonMasks
from detectron2.utils.events import EventStorage
from PIL import Image

import dcnv2
from dcnv2.dialects import datasets_used
from dcnv2.engine import Trainer
from dcnv2.engine.amp import AutocastTrainer, amp_trainer
from dcnv2.engine.lazy import do_test, do_train
from dcnv2.engine.solver import build_optimizer, offset_lr_factor_func
from dcnv2.layers import DeformConv, ModulatedDeformConv
from dcnv2.lazy_config import get_detectron2_config, load_config

RECIPES = [
    "faster_rcnn_R50_mdconv_FPN_1x",
    "faster_rcnn_R50_mdconv_group4_FPN_1x",
    "faster_rcnn_R50_dconv_FPN_1x",
    "faster_rcnn_R101_mdconv_FPN_1x",
    "faster_rcnn_X101_32x4d_mdconv_FPN_1x",
    "faster_rcnn_R50_mdconv_FPN_3x",
    "mask_rcnn_R50_mdconv_FPN_1x",
    "mask_rcnn_R50_mdconv_FPN_1x_amp",
    "mask_rcnn_R50_dconv_FPN_1x",
    "cascade_rcnn_R50_mdconv_FPN_1x",
    "cascade_mask_rcnn_R50_mdconv_FPN_1x",
    "retinanet_R50_mdconv_FPN_1x",
]
# What each recipe must be: (deformable layers, modulated, deformable groups, masks, box stages).
EXPECTED = {
    "faster_rcnn_R50_mdconv_FPN_1x": (13, True, 1, False, 1),
    "faster_rcnn_R50_mdconv_group4_FPN_1x": (13, True, 4, False, 1),
    "faster_rcnn_R50_dconv_FPN_1x": (13, False, 1, False, 1),
    "faster_rcnn_R101_mdconv_FPN_1x": (30, True, 1, False, 1),
    "faster_rcnn_X101_32x4d_mdconv_FPN_1x": (30, True, 1, False, 1),
    "faster_rcnn_R50_mdconv_FPN_3x": (13, True, 1, False, 1),
    "mask_rcnn_R50_mdconv_FPN_1x": (13, True, 1, True, 1),
    "mask_rcnn_R50_mdconv_FPN_1x_amp": (13, True, 1, True, 1),
    "mask_rcnn_R50_dconv_FPN_1x": (13, False, 1, True, 1),
    "cascade_rcnn_R50_mdconv_FPN_1x": (13, True, 1, False, 3),
    "cascade_mask_rcnn_R50_mdconv_FPN_1x": (13, True, 1, True, 3),
    "retinanet_R50_mdconv_FPN_1x": (13, True, 1, False, 0),
}
H, W = 128, 160  # not square, on purpose

# Small proposal/sampling sizes: the test is about wiring, not the recipe's sizes.
YAML_SMALL = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "100", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "100", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.RETINANET.TOPK_CANDIDATES_TEST", "50",
]  # fmt: skip


def _shrink_lazy(cfg):
    model = cfg.model
    if "proposal_generator" in model:
        model.proposal_generator.update(
            pre_nms_topk=(100, 100), post_nms_topk=(50, 50), batch_size_per_image=32
        )
        model.roi_heads.batch_size_per_image = 32
    else:
        model.test_topk_candidates = 50
    return cfg


def _yaml_cfg(name, *opts):
    return dcnv2.get_cfg(name + ".yaml", YAML_SMALL + list(opts))


def _lazy_cfg(name):
    return _shrink_lazy(load_config(f"lazy/{name}.py"))


def _inputs(seed=0):
    """Two images: one with two objects (boxes, classes, polygon masks), one without any."""
    g = torch.Generator().manual_seed(seed)
    annotated = Instances((H, W))
    annotated.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 90.0, 100.0], [60.0, 20.0, 150.0, 70.0]]))
    annotated.gt_classes = torch.tensor([3, 17])
    annotated.gt_masks = PolygonMasks(
        [
            [np.array([10, 12, 90, 12, 50, 100], dtype=float)],
            [np.array([60, 20, 150, 20, 150, 70, 60, 70], dtype=float)],
        ]
    )
    empty = Instances((H, W))
    empty.gt_boxes = Boxes(torch.zeros(0, 4))
    empty.gt_classes = torch.zeros(0, dtype=torch.long)
    empty.gt_masks = PolygonMasks([])
    images = torch.randint(0, 256, (2, 3, H, W), generator=g).float()
    return [
        {"image": image, "instances": inst, "height": H, "width": W}
        for image, inst in zip(images, (annotated, empty))
    ]


def _check_recipe(model, name):
    deform = [m for m in model.modules() if isinstance(m, (ModulatedDeformConv, DeformConv))]
    n_deform, modulated, groups, masks, box_stages = EXPECTED[name]
    assert len(deform) == n_deform
    assert all(isinstance(m, ModulatedDeformConv) == modulated for m in deform)
    assert all(m.deformable_groups == groups for m in deform)
    if box_stages:  # R-CNN
        assert model.roi_heads.mask_on == masks
        assert getattr(model.roi_heads, "num_cascade_stages", 1) == box_stages


def _train_and_infer(model, name):
    model.train()
    with EventStorage(0):
        losses = model(_inputs())
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    assert ("loss_mask" in losses) == EXPECTED[name][3]
    sum(losses.values()).backward()
    offset_grads = [p.grad for n, p in model.named_parameters() if "conv2_offset" in n]
    assert offset_grads and all(g is not None and torch.isfinite(g).all() for g in offset_grads)
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": _inputs()[0]["image"], "height": 64, "width": 80}])
    instances = out["instances"]
    assert instances.image_size == (64, 80)  # rescaled to the requested output size
    assert instances.pred_boxes.tensor.shape[1] == 4
    assert instances.has("pred_masks") == EXPECTED[name][3]


def _param_shapes(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


# R101/X101 are the slowest to train on 2 cores; for them the parity test below (same parameters
# as the YAML model, same outputs at 64x96) is the check, as their R-50 siblings train here.
_TRAINED = [r for r in RECIPES if "101" not in r]


@pytest.mark.parametrize("name", _TRAINED)
def test_yaml_recipe_trains_and_infers_on_cpu(name):
    torch.manual_seed(0)
    model = build_model(_yaml_cfg(name))
    _check_recipe(model, name)
    _train_and_infer(model, name)


@pytest.mark.parametrize("name", _TRAINED)
def test_lazy_recipe_trains_and_infers_on_cpu(name):
    torch.manual_seed(0)
    model = instantiate(_lazy_cfg(name).model)
    _check_recipe(model, name)
    _train_and_infer(model, name)


@pytest.mark.parametrize("name", RECIPES)
def test_yaml_and_lazy_versions_build_the_same_model(name):
    torch.manual_seed(0)
    yaml_model = build_model(_yaml_cfg(name)).eval()
    lazy_model = instantiate(_lazy_cfg(name).model).eval()
    _check_recipe(lazy_model, name)
    assert _param_shapes(yaml_model) == _param_shapes(lazy_model)
    # Same weights in, same features and detections out: the recipes match beyond shapes
    # (pixel normalisation, strides, the heads' test-time settings).
    lazy_model.load_state_dict(yaml_model.state_dict(), strict=True)
    batch = [{"image": torch.rand(3, 64, 96) * 255}]
    with torch.no_grad():
        features = [m.backbone(m.preprocess_image(batch).tensor) for m in (yaml_model, lazy_model)]
        outputs = [m(batch)[0]["instances"].get_fields() for m in (yaml_model, lazy_model)]
    assert features[0].keys() == features[1].keys()
    for key in features[0]:
        torch.testing.assert_close(features[0][key], features[1][key])
    assert outputs[0].keys() == outputs[1].keys()
    for key, value in outputs[0].items():
        other = outputs[1][key]
        if isinstance(value, Boxes):
            value, other = value.tensor, other.tensor
        torch.testing.assert_close(value, other)


def test_recipe_settings_match_their_headers():
    x101 = dcnv2.get_cfg("faster_rcnn_X101_32x4d_mdconv_FPN_1x.yaml")
    r = x101.MODEL.RESNETS
    assert (r.DEPTH, r.NUM_GROUPS, r.WIDTH_PER_GROUP, r.STRIDE_IN_1X1) == (101, 32, 4, False)
    assert x101.INPUT.FORMAT == "RGB" and list(x101.MODEL.PIXEL_STD) == [58.395, 57.12, 57.375]
    lazy_x101 = load_config("lazy/faster_rcnn_X101_32x4d_mdconv_FPN_1x.py")
    assert lazy_x101.train.init_checkpoint == x101.MODEL.WEIGHTS
    assert lazy_x101.dataloader.test.mapper.image_format == "RGB"  # follows the train mapper
    three_x = dcnv2.get_cfg("faster_rcnn_R50_mdconv_FPN_3x.yaml").SOLVER
    assert (tuple(three_x.STEPS), three_x.MAX_ITER) == ((210000, 250000), 270000)
    assert load_config("lazy/faster_rcnn_R50_mdconv_FPN_3x.py").train.max_iter == 270000
    assert dcnv2.get_cfg("mask_rcnn_R50_mdconv_FPN_1x_amp.yaml").SOLVER.AMP.ENABLED
    assert load_config("lazy/mask_rcnn_R50_mdconv_FPN_1x_amp.py").train.amp.enabled
    assert not load_config("lazy/mask_rcnn_R50_mdconv_FPN_1x.py").train.amp.enabled
    retina = dcnv2.get_cfg("retinanet_R50_mdconv_FPN_1x.yaml")
    assert retina.SOLVER.BASE_LR == load_config("lazy/retinanet_R50_mdconv_FPN_1x.py").optimizer.lr
    sizes = retina.MODEL.ANCHOR_GENERATOR.SIZES
    assert [round(s, 6) for s in sizes[1]] == [round(64 * 2 ** (i / 3), 6) for i in range(3)]


# ---------------------------------------------------------------- offset learning-rate multiplier


def test_offset_lr_multiplier_scales_conv2_offset_groups():
    cfg = _yaml_cfg("faster_rcnn_R50_mdconv_FPN_1x", "MODEL.DCNV2.OFFSET_LR_MULTIPLIER", "0.1")
    model = build_model(cfg)
    lr_of = {}
    for group in build_optimizer(cfg, model).param_groups:
        for p in group["params"]:
            lr_of[p] = group["lr"]
    offset = {n for n, p in model.named_parameters() if ".conv2_offset." in n and p.requires_grad}
    assert len(offset) == 26  # weight and bias of 13 deformable blocks
    for n, p in model.named_parameters():
        if p.requires_grad:
            expected = cfg.SOLVER.BASE_LR * (0.1 if n in offset else 1.0)
            assert math.isclose(lr_of[p], expected), n


def test_default_multiplier_gives_detectron2s_optimizer():
    cfg = _yaml_cfg("mask_rcnn_R50_mdconv_FPN_1x")
    assert cfg.MODEL.DCNV2.OFFSET_LR_MULTIPLIER == 1.0
    model = build_model(cfg)
    ours, theirs = build_optimizer(cfg, model), d2_build_optimizer(cfg, model)

    def groups(opt):
        return [
            ({k: v for k, v in g.items() if k != "params"}, [id(p) for p in g["params"]])
            for g in opt.param_groups
        ]

    assert groups(ours) == groups(theirs)
    assert type(ours) is type(theirs)


def test_trainer_uses_the_offset_lr_and_lazy_configs_can_set_it():
    cfg = _yaml_cfg("faster_rcnn_R50_mdconv_FPN_1x", "MODEL.DCNV2.OFFSET_LR_MULTIPLIER", "0.5")
    model = build_model(cfg)
    optimizer = Trainer.build_optimizer(cfg, model)
    offset_param = model.backbone.bottom_up.res4[0].conv2_offset.weight
    (lr,) = [g["lr"] for g in optimizer.param_groups if any(p is offset_param for p in g["params"])]
    assert math.isclose(lr, 0.5 * cfg.SOLVER.BASE_LR)

    lazy = load_config("lazy/faster_rcnn_R50_mdconv_FPN_1x.py")
    lazy.optimizer.params.lr_factor_func.multiplier = 0.1
    lazy.optimizer.params.model = instantiate(lazy.model)
    opt = instantiate(lazy.optimizer)
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == pytest.approx([0.1 * lazy.optimizer.lr, lazy.optimizer.lr])


def test_offset_lr_factor_rejects_bad_values():
    with pytest.raises(ValueError, match=">= 0"):
        offset_lr_factor_func(-0.1)
    with pytest.raises(ValueError, match=">= 0"):
        offset_lr_factor_func(float("nan"))
    factor = offset_lr_factor_func(0.1)
    assert factor("backbone.bottom_up.res3.0.conv2_offset.weight") == 0.1
    assert factor("backbone.bottom_up.res3.0.conv2.weight") == 1.0
    assert factor("module.backbone.bottom_up.res5.2.conv2_offset.bias") == 0.1  # DDP prefix


# ------------------------------------------------------------------ training loops, AMP on CPU


@pytest.fixture
def tiny_dataset(tmp_path):
    """A registered 2-image COCO-style dataset: one image with two objects, one without."""
    name = f"dcnv2_family_tiny_{os.getpid()}_{id(tmp_path)}"
    rng = np.random.default_rng(0)
    records = []
    for i, annotated in enumerate((True, False)):
        path = str(tmp_path / f"im{i}.png")
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)
        annotations = []
        if annotated:
            for (x0, y0, x1, y1), cls in (((10, 12, 90, 100), 0), ((60, 20, 150, 70), 2)):
                annotations.append(
                    {
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "bbox_mode": BoxMode.XYWH_ABS,
                        "category_id": cls,
                        "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                        "iscrowd": 0,
                    }
                )
        records.append(
            {"file_name": path, "image_id": i, "height": H, "width": W, "annotations": annotations}
        )
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(thing_classes=["a", "b", "c"], evaluator_type="coco")
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _dtype_probe(model):
    """Forward hooks recording the output dtype of a deformable conv and of the conv after it."""
    seen = {}

    def probe(key):
        def hook(module, inputs, output):
            seen.setdefault(key, output.dtype)

        return hook

    block = model.backbone.bottom_up.res4[0]
    block.conv2.register_forward_hook(probe("deform"))
    block.conv3.register_forward_hook(probe("conv"))
    return seen


def test_amp_yaml_trains_two_iterations_on_cpu_in_bfloat16(tiny_dataset, tmp_path):
    cfg = _yaml_cfg(
        "mask_rcnn_R50_mdconv_FPN_1x_amp",
        "DATASETS.TRAIN", f"('{tiny_dataset}',)", "DATASETS.TEST", "()",
        "DATALOADER.NUM_WORKERS", "0", "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.BASE_LR", "0.001",
        "SOLVER.CHECKPOINT_PERIOD", "100000",
        "INPUT.MIN_SIZE_TRAIN", f"({H},)", "INPUT.MAX_SIZE_TRAIN", str(W),
        "OUTPUT_DIR", str(tmp_path / "out"),
    )  # fmt: skip
    assert cfg.SOLVER.AMP.ENABLED
    trainer = Trainer(cfg)
    assert isinstance(trainer._trainer, AutocastTrainer)
    assert trainer._trainer.precision == torch.bfloat16
    seen = _dtype_probe(trainer.model)
    before = trainer.model.roi_heads.mask_head.predictor.weight.detach().clone()
    trainer.train()
    assert trainer.iter == 2  # iterations 0 and 1 ran
    # The deformable op runs in float32 under autocast; the convs around it in bfloat16.
    assert seen == {"deform": torch.float32, "conv": torch.bfloat16}
    history = trainer.storage.history("total_loss").values()
    assert len(history) == 2 and all(math.isfinite(v) for v, _ in history)
    assert not torch.equal(before, trainer.model.roi_heads.mask_head.predictor.weight)


def test_amp_trainer_keeps_detectron2s_on_cuda_only():
    from detectron2.engine import AMPTrainer

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cpu = amp_trainer(model, [], opt)
    assert type(cpu) is AutocastTrainer and cpu.device_type == "cpu"
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available: detectron2's AMPTrainer is used only on CUDA")
    assert type(amp_trainer(model.cuda(), [], opt)) is AMPTrainer


def test_lazy_amp_config_trains_and_evaluates_through_do_train(tiny_dataset, tmp_path):
    cfg = _lazy_cfg("mask_rcnn_R50_mdconv_FPN_1x_amp")
    cfg.dataloader.train.dataset.names = tiny_dataset
    cfg.dataloader.train.dataset.filter_empty = False
    cfg.dataloader.train.update(total_batch_size=2, num_workers=0)
    cfg.dataloader.train.mapper.augmentations = []
    cfg.dataloader.test.dataset.names = tiny_dataset
    cfg.dataloader.test.update(num_workers=0)
    cfg.dataloader.test.mapper.augmentations = []
    cfg.dataloader.evaluator.output_dir = str(tmp_path / "eval")
    cfg.train.update(
        device="cpu", max_iter=2, eval_period=0, init_checkpoint="", output_dir=str(tmp_path)
    )
    cfg.train.checkpointer.period = 100000
    train, test = datasets_used(cfg)
    assert list(test) + list(train) == [tiny_dataset, tiny_dataset]
    assert list(test) == [tiny_dataset]

    class Args:
        resume = False

    do_train(cfg, Args())  # 2 AMP iterations, then the final evaluation (EvalHook -> do_test)
    assert os.path.isfile(tmp_path / "model_final.pth")
    with open(tmp_path / "metrics.json") as f:
        metrics = [json.loads(line) for line in f]
    (trained,) = [m for m in metrics if "total_loss" in m]
    assert trained["iteration"] == 1 and math.isfinite(trained["total_loss"])
    assert any("bbox/AP" in m for m in metrics)  # the final evaluation ran and was logged
    del cfg.dataloader.evaluator
    assert do_test(cfg, None) is None  # no evaluator: nothing to evaluate


def test_lazy_cuda_device_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    cfg = load_config("lazy/faster_rcnn_R50_mdconv_FPN_1x.py")  # train.device = "cuda"

    class Args:
        resume = False

    with pytest.raises(RuntimeError, match="train.device=cpu"):
        do_train(cfg, Args())


def test_detectron2_config_pieces_and_errors():
    assert "model" in get_detectron2_config("common/models/retinanet.py")
    with pytest.raises(FileNotFoundError, match="common/models/mask_rcnn_fpn.py"):
        get_detectron2_config("common/models/no_such_model.py")
    with pytest.raises(ValueError, match="expected a .py file"):
        load_config("faster_rcnn_R50_mdconv_FPN_1x.yaml")
    with pytest.raises(FileNotFoundError, match="lazy/faster_rcnn_R50_mdconv_FPN_1x.py"):
        load_config("lazy/faster_rcnn_R50_nothing.py")


def test_train_net_runs_lazy_configs_through_the_lazy_branch():
    """train_net.py loads a .py config as a LazyConfig (key=value overrides) and checks its
    datasets before starting any worker."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "train_net.py"),
            "--config-file",
            "lazy/faster_rcnn_R50_mdconv_FPN_1x.py",
            "train.device=cpu",
            "dataloader.train.dataset.names=dcnv2_no_such_dataset",
            "dataloader.test.dataset.names=dcnv2_no_such_dataset",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "error:" in result.stderr and "dcnv2_no_such_dataset" in result.stderr
    assert "not registered" in result.stderr
