"""Every YAML config shipped under configs/ loads with dcnv2.get_cfg and builds a model on CPU."""

import collections

import pytest
import torch
from detectron2.modeling import build_model

import dcnv2
from dcnv2.layers import DeformConv, ModulatedDeformConv

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
