"""torchvision ImageNet ResNet -> detectron2 initialisation: torchvision's own state dicts (its
real key schema, random values) convert, load with only the FPN/head (and zero-initialised
offset) tensors missing, and compute the same features as torchvision's model."""

import importlib.util
import os
import pickle

import pytest
import torch
import torchvision
from detectron2.modeling import build_model

import dcnv2
from dcnv2.checkpoint import DCNv2Checkpointer
from dcnv2.checkpoint.convert_torchvision import (
    convert_torchvision_checkpoint,
    convert_torchvision_state_dict,
)
from dcnv2.checkpoint.weights_io import ConversionError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""]


class _Recording(DCNv2Checkpointer):
    """Keeps what the checkpointer would log about keys that did not match."""

    def _log_incompatible_keys(self, incompatible):
        self.incompatible = incompatible


def _randomized(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=g))
                module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=g))
                module.weight.copy_(0.5 + 0.5 * torch.rand(module.num_features, generator=g))
                module.bias.copy_(0.1 * torch.randn(module.num_features, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tv")
    resnet = _randomized(torchvision.models.resnet50(weights=None))
    src, out = str(tmp / "resnet50.pth"), str(tmp / "R-50-tv.pkl")
    torch.save(resnet.state_dict(), src)
    spec, dropped = convert_torchvision_checkpoint(src, out)
    return resnet, spec, dropped, out


def test_converts_with_the_pytorch_style_overrides(converted):
    _, spec, dropped, out = converted
    assert spec.depth == 50 and spec.num_groups == 1 and spec.width_per_group == 64
    overrides = dict(spec.overrides())
    assert overrides["MODEL.RESNETS.STRIDE_IN_1X1"] == "False"
    assert overrides["INPUT.FORMAT"] == "RGB"
    assert overrides["MODEL.PIXEL_MEAN"] == "[123.675, 116.28, 103.53]"
    assert overrides["MODEL.PIXEL_STD"] == "[58.395, 57.12, 57.375]"
    assert {"fc.weight", "fc.bias"} <= set(dropped)
    with open(out, "rb") as f:
        data = pickle.load(f)
    assert data["__author__"] == "torchvision" and data["matching_heuristics"] is True
    assert "res5.2.conv3.norm.running_var" in data["model"] and "fc.weight" not in data["model"]


def test_loads_into_the_mdconv_fpn_model_with_only_fpn_and_head_keys_missing(converted):
    resnet, spec, _, out = converted
    opts = CPU + [x for pair in spec.overrides() for x in pair]
    model = build_model(dcnv2.get_cfg("faster_rcnn_R50_mdconv_FPN_1x.yaml", opts))
    checkpointer = _Recording(model)
    checkpointer.load(out)
    incompatible = checkpointer.incompatible
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
    missing = set(incompatible.missing_keys)
    head = {
        k
        for k in model.state_dict()
        if k.startswith(("backbone.fpn_", "proposal_generator.", "roi_heads."))
    }
    offsets = {k for k in model.state_dict() if ".conv2_offset." in k}  # zero-init, as mmcv's
    assert len(offsets) == 2 * 13
    assert missing == head | offsets
    body = model.backbone.bottom_up
    tv = resnet.state_dict()
    assert torch.equal(body.stem.conv1.weight, tv["conv1.weight"])
    assert torch.equal(body.res3[0].conv2.weight, tv["layer2.0.conv2.weight"])  # a deformable one
    assert torch.equal(
        body.res5[0].shortcut.norm.running_var, tv["layer4.0.downsample.1.running_var"]
    )


def test_the_converted_body_computes_torchvisions_features(converted):
    resnet, spec, _, out = converted
    opts = CPU + [x for pair in spec.overrides() for x in pair]
    model = build_model(dcnv2.get_cfg("faster_rcnn_R50_FPN_1x.yaml", opts)).eval()
    DCNv2Checkpointer(model).load(out)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.backbone.bottom_up(x)
        t = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
        for name, layer in (("res2", resnet.layer1), ("res3", resnet.layer2),
                            ("res4", resnet.layer3), ("res5", resnet.layer4)):  # fmt: skip
            t = layer(t)
            torch.testing.assert_close(got[name], t, rtol=1e-4, atol=1e-4 * t.abs().max().item())


def test_resnext_converts_with_its_groups():
    weights, spec, _ = convert_torchvision_state_dict(
        torchvision.models.resnext50_32x4d(weights=None).state_dict()
    )
    assert (spec.num_groups, spec.width_per_group) == (32, 4)
    assert weights["res2.0.conv2.weight"].shape == (128, 4, 3, 3)


def test_basic_block_resnets_and_stray_tensors_are_refused():
    with pytest.raises(ConversionError, match="R18/R34"):
        convert_torchvision_state_dict(torchvision.models.resnet18(weights=None).state_dict())
    state_dict = torchvision.models.resnet50(weights=None).state_dict()
    state_dict["layer1.0.se.fc.weight"] = torch.zeros(4, 4)
    with pytest.raises(ConversionError, match="layer1.0.se.fc.weight"):
        convert_torchvision_state_dict(state_dict)


def test_tool_prints_the_overrides(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "convert_torchvision_to_d2", os.path.join(REPO, "tools", "convert_torchvision_to_d2.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    src, out = str(tmp_path / "r50.pth"), str(tmp_path / "r50.pkl")
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), src)
    assert tool.main([src, out]) == 0
    printed = capsys.readouterr().out
    assert f"MODEL.WEIGHTS {out}" in printed and "MODEL.RESNETS.STRIDE_IN_1X1 False" in printed
    assert tool.main([src, str(tmp_path / "r50.pth.out")]) == 2  # not a .pkl
    assert ".pkl" in capsys.readouterr().err
