"""Every YAML config shipped under configs/ loads with dcnv2.get_cfg and builds a model on CPU;
the embedded default has a LazyConfig twin; numeric settings a run cannot work with stop
train_net.py before it writes anything."""

import argparse
import collections
import importlib.util
import os

import pytest
import torch
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

import dcnv2
from dcnv2.config import check_solver, datasets_used, load_config
from dcnv2.data.synthetic import register_synthetic_dataset
from dcnv2.engine.lazy import do_train
from dcnv2.layers import DeformConv, ModulatedDeformConv

TRAIN_NET = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_net.py"
)

YAML_CONFIGS = [name for name in dcnv2.list_config_files() if name.endswith(".yaml")]
ON_CPU = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""]


def _deformable_convs_per_stage(model):
    """{stage: [conv class, ...]} of the deformable convs in the ResNet body."""
    found = collections.defaultdict(list)
    for name, module in model.backbone.bottom_up.named_modules():
        if isinstance(module, (DeformConv, ModulatedDeformConv)):
            found[name.split(".")[0]].append(type(module))
    return found


def test_the_shipped_yaml_configs_are_found():
    assert {"faster_rcnn_R50_mdconv_FPN_1x.yaml", "faster_rcnn_R50_FPN_1x.yaml"} <= set(
        YAML_CONFIGS
    )


@pytest.mark.parametrize("name", YAML_CONFIGS)
def test_config_loads_and_builds_a_model_on_cpu(name):
    cfg = dcnv2.get_cfg(name, ON_CPU)
    model = build_model(cfg)
    params = list(model.parameters())
    assert sum(p.numel() for p in params) > 1_000_000
    assert {p.device for p in params} == {torch.device("cpu")}


@pytest.mark.parametrize(
    "name",
    ["faster_rcnn_R50_mdconv_FPN_1x.yaml", "quick/faster_rcnn_R50_mdconv_FPN_instant.yaml"],
)
def test_mdconv_configs_have_13_modulated_deformable_convs_in_c3_to_c5(name):
    found = _deformable_convs_per_stage(build_model(dcnv2.get_cfg(name, ON_CPU)))
    assert {stage: len(convs) for stage, convs in found.items()} == {
        "res3": 4,
        "res4": 6,
        "res5": 3,
    }
    assert all(cls is ModulatedDeformConv for convs in found.values() for cls in convs)


def test_baseline_config_has_no_deformable_conv():
    model = build_model(dcnv2.get_cfg("faster_rcnn_R50_FPN_1x.yaml", ON_CPU))
    assert not _deformable_convs_per_stage(model)


def test_every_dcnv2_recipe_has_a_lazy_config_twin():
    """Each top-level YAML recipe has configs/lazy/<name>.py (the plain baseline excepted: it is
    detectron2's own common/models recipe)."""
    names = dcnv2.list_config_files()
    lazy = {n[len("lazy/") : -len(".py")] for n in names if n.startswith("lazy/")}
    recipes = {
        n[: -len(".yaml")]
        for n in names
        if n.endswith(".yaml") and "/" not in n and not n.startswith("Base-")
    }
    assert "faster_rcnn_R50_mdconv_mdpool_mimic_FPN_1x" in recipes
    assert recipes - lazy == {"faster_rcnn_R50_FPN_1x"}


def _train_net():
    spec = importlib.util.spec_from_file_location("_train_net_under_test", TRAIN_NET)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "opts, message",
    [
        (["SOLVER.MAX_ITER", "0"], "SOLVER.MAX_ITER is 0; expected at least 1 iteration"),
        (["SOLVER.BASE_LR", "-0.01"], "SOLVER.BASE_LR is -0.01; expected a finite learning rate"),
        (["SOLVER.BASE_LR", "nan"],
         "SOLVER.BASE_LR: 'nan' is not a finite number; expected a float like 0.02"),
        (["SOLVER.BASE_LR", "1e999"], "SOLVER.BASE_LR is inf; expected a finite learning rate"),
        (["SOLVER.WEIGHT_DECAY", "-1e-4"], "SOLVER.WEIGHT_DECAY is -0.0001; expected a finite"),
        (["SOLVER.IMS_PER_BATCH", "0"], "SOLVER.IMS_PER_BATCH is 0; expected at least 1 image"),
        (["SOLVER.STEPS", "(100, 50)"],
         "SOLVER.STEPS is (100, 50); expected increasing positive iterations"),
        (["SOLVER.STEPS", "(140,)"], "SOLVER.STEPS is (140,), a step at the run's last iteration"),
        (["SOLVER.WARMUP_ITERS", "141"],
         "SOLVER.WARMUP_ITERS 141 is longer than the run (SOLVER.MAX_ITER 140)"),
        (["SOLVER.CHECKPOINT_PERIOD", "0"], "SOLVER.CHECKPOINT_PERIOD is 0; expected at least 1"),
    ],
)  # fmt: skip
def test_numeric_settings_that_cannot_work_stop_train_net_before_it_writes(
    opts, message, tmp_path, capsys
):
    out = tmp_path / "out"
    argv = ["--config-file", "quick/faster_rcnn_R50_mdconv_FPN_instant.yaml", *opts]
    with pytest.raises(SystemExit) as exit_info:
        _train_net().invoke_main([*argv, "OUTPUT_DIR", str(out)])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and stderr.count("error:") == 1, stderr
    assert stderr.startswith(f"train_net.py: error: {message}"), stderr
    assert not out.exists()  # no config.yaml, no log.txt


def test_steps_after_the_run_and_a_run_as_long_as_its_warmup_pass():
    # detectron2 ignores steps after MAX_ITER (with a warning): a shortened recipe still runs.
    check_solver(dcnv2.get_cfg("faster_rcnn_R50_mdconv_FPN_1x.yaml", ["SOLVER.MAX_ITER", "1000"]))
    quick = "quick/faster_rcnn_R50_mdconv_FPN_instant.yaml"
    check_solver(dcnv2.get_cfg(quick, ["SOLVER.MAX_ITER", "20"]))  # WARMUP_ITERS 20


def test_instant_lazy_config_is_the_yaml_twin_and_trains_on_cpu(tmp_path):
    """configs/quick/*.py builds the model of the YAML embedded default, and trains (2 small
    iterations here) on CPU with no other override than the dataset's size."""
    cfg = load_config("quick/faster_rcnn_R50_mdconv_FPN_instant.py")
    yaml_cfg = dcnv2.get_cfg("quick/faster_rcnn_R50_mdconv_FPN_instant.yaml")
    shapes = {k: v.shape for k, v in build_model(yaml_cfg).state_dict().items()}
    assert {k: v.shape for k, v in instantiate(cfg.model).state_dict().items()} == shapes
    assert (cfg.train.device, cfg.train.init_checkpoint, cfg.train.max_iter) == ("cpu", "", 140)
    assert datasets_used(cfg) == (("dcnv2_synthetic_train",), ("dcnv2_synthetic_val",))

    name = "_instant_lazy_synthetic"
    register_synthetic_dataset(name, str(tmp_path / "data"), "train", 4, 0)
    try:
        cfg = load_config(
            "quick/faster_rcnn_R50_mdconv_FPN_instant.py",
            [f"dataloader.train.dataset.names={name}", "dataloader.train.total_batch_size=2",
             "dataloader.train.num_workers=0", "train.max_iter=2",
             f"train.output_dir={tmp_path / 'out'}"],
        )  # fmt: skip
        check_solver(cfg)
        del cfg.dataloader.evaluator  # training only
        do_train(cfg, argparse.Namespace(resume=False))
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert (tmp_path / "out" / "model_final.pth").is_file()
