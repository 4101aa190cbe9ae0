"""The deformable ResNet/FPN backbones: shapes, strides, parameter names, deformable layers."""

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone
from detectron2.modeling.backbone import resnet as d2_resnet

import dcnv2
from dcnv2.layers import DeformConv, ModulatedDeformConv
from dcnv2.modeling import DCNv2BottleneckBlock, make_dcnv2_stages


def _cfg(**resnets):
    cfg = dcnv2.get_cfg("faster_rcnn_R50_mdconv_FPN_1x.yaml")
    cfg.MODEL.DEVICE = "cpu"
    for k, v in resnets.items():
        setattr(cfg.MODEL.RESNETS, k, v)
    return cfg


def _deform_layers(module):
    return [
        n for n, m in module.named_modules() if isinstance(m, (ModulatedDeformConv, DeformConv))
    ]


def test_backbones_registered():
    assert "build_dcnv2_resnet_backbone" in BACKBONE_REGISTRY
    assert "build_dcnv2_resnet_fpn_backbone" in BACKBONE_REGISTRY


def test_seed_backbone_fpn_shapes_and_strides():
    backbone = build_backbone(_cfg()).eval()
    # FPN needs sizes divisible by 32 (the detector pads its input to that: size_divisibility).
    assert backbone.size_divisibility == 32
    x = torch.randn(2, 3, 128, 192)
    with torch.no_grad():
        out = backbone(x)
    shapes = backbone.output_shape()
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    for name, stride in zip(out, (4, 8, 16, 32, 64)):
        assert shapes[name].stride == stride
        assert shapes[name].channels == 256
        assert out[name].shape[:2] == (2, 256)
    assert out["p2"].shape[-2:] == (32, 48)
    assert out["p5"].shape[-2:] == (4, 6)
    assert out["p6"].shape[-2:] == (2, 3)


def test_seed_has_13_modulated_deformable_convs_in_res3_to_res5():
    bottom_up = build_backbone(_cfg()).bottom_up
    layers = _deform_layers(bottom_up)
    assert len(layers) == 13
    per_stage = {
        s: sum(n.startswith(s + ".") for n in layers) for s in ("res2", "res3", "res4", "res5")
    }
    assert per_stage == {"res2": 0, "res3": 4, "res4": 6, "res5": 3}
    assert all(
        isinstance(m, ModulatedDeformConv) for n, m in bottom_up.named_modules() if n in layers
    )
    # 27 = 18 offsets + 9 mask logits per deformable group
    assert bottom_up.res3[0].conv2_offset.out_channels == 27


def test_dcnv1_and_deformable_groups():
    cfg = _cfg(DEFORM_MODULATED=False, DEFORM_NUM_GROUPS=4)
    bottom_up = build_backbone(cfg).bottom_up
    block = bottom_up.res4[0]
    assert isinstance(block.conv2, DeformConv) and not isinstance(block.conv2, ModulatedDeformConv)
    assert block.conv2_offset.out_channels == 18 * 4
    with torch.no_grad():
        out = bottom_up(torch.randn(1, 3, 64, 96))
    assert out["res5"].shape == (1, 2048, 2, 3)


def test_parameter_names_match_detectron2_deform_bottleneck(monkeypatch):
    """detectron2 checkpoints with deformable layers must load without renaming.

    detectron2's own builder is used as the reference; its DeformBottleneckBlock needs the
    compiled op only to run, so its conv classes are swapped for ours to construct it.
    """
    monkeypatch.setattr(d2_resnet, "ModulatedDeformConv", ModulatedDeformConv)
    monkeypatch.setattr(d2_resnet, "DeformConv", DeformConv)
    for modulated in (True, False):
        cfg = _cfg(DEFORM_MODULATED=modulated, DEFORM_NUM_GROUPS=2)
        ref = d2_resnet.build_resnet_backbone(cfg, ShapeSpec(channels=3))
        ours = BACKBONE_REGISTRY.get("build_dcnv2_resnet_backbone")(cfg, ShapeSpec(channels=3))
        ref_sd, our_sd = ref.state_dict(), ours.state_dict()
        assert list(our_sd) == list(ref_sd)
        assert {k: v.shape for k, v in our_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
        # and a detectron2 state dict loads strictly and gives the same outputs
        ours.load_state_dict(ref_sd, strict=True)
        x = torch.randn(1, 3, 64, 64)
        torch.manual_seed(0)
        with torch.no_grad():
            for block in ref.res3:  # random offsets so the deformable path matters
                torch.nn.init.normal_(block.conv2_offset.weight, std=0.01)
            ours.load_state_dict(ref.state_dict())
            ref_out, our_out = ref(x), ours(x)
        for k in ref_out:
            torch.testing.assert_close(our_out[k], ref_out[k])


@pytest.mark.parametrize("modulated", [True, False])
def test_block_is_detectron2s_deform_bottleneck_with_the_same_keys_and_init(monkeypatch, modulated):
    """Same arguments, same seed: the same state dict (names, order, values) as detectron2's
    DeformBottleneckBlock, and the same outputs from the same weights."""
    # detectron2's block without its compiled op cannot construct its deformable conv; ours
    # stands in for it (same constructor, same parameters), in the reference only.
    monkeypatch.setattr(d2_resnet, "ModulatedDeformConv", ModulatedDeformConv)
    monkeypatch.setattr(d2_resnet, "DeformConv", DeformConv)
    kwargs = dict(
        bottleneck_channels=8,
        stride=2,
        num_groups=2,
        norm="BN",
        stride_in_1x1=True,
        dilation=1,
        deform_modulated=modulated,
        deform_num_groups=2,
    )
    torch.manual_seed(0)
    ref = d2_resnet.DeformBottleneckBlock(16, 32, **kwargs).eval()
    torch.manual_seed(0)
    ours = DCNv2BottleneckBlock(16, 32, backend="native", **kwargs).eval()
    assert isinstance(ours, d2_resnet.DeformBottleneckBlock)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    for key in ref_sd:
        torch.testing.assert_close(our_sd[key], ref_sd[key], rtol=0, atol=0, msg=key)
    assert ours.conv2.backend == "native" and type(ours.conv2) is type(ref.conv2)
    with torch.no_grad():
        torch.nn.init.normal_(ours.conv2_offset.weight, std=0.1)
        torch.nn.init.normal_(ours.conv2_offset.bias, std=0.5)
        ref.load_state_dict(ours.state_dict(), strict=True)
        x = torch.randn(2, 16, 9, 11)
        torch.testing.assert_close(ours(x), ref(x))


def test_offset_conv_zero_initialised_so_block_starts_as_plain_bottleneck():
    torch.manual_seed(0)
    block = DCNv2BottleneckBlock(64, 256, bottleneck_channels=64, norm="BN").eval()
    assert block.conv2_offset.weight.abs().sum() == 0 and block.conv2_offset.bias.abs().sum() == 0
    x = torch.randn(1, 64, 9, 11)
    with torch.no_grad():
        out = block(x)
        # The same computation with a dense 3x3 conv, taps scaled by sigmoid(0) = 0.5.
        h = torch.relu(block.conv1(x))
        h = torch.nn.functional.conv2d(h, block.conv2.weight * 0.5, padding=1)
        h = torch.relu(block.conv2.norm(h))
        expected = torch.relu(block.conv3(h) + block.shortcut(x))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_resnext_depth_freeze_and_dilation():
    cfg = _cfg(DEPTH=101, NUM_GROUPS=32, WIDTH_PER_GROUP=4, STRIDE_IN_1X1=False, RES5_DILATION=2)
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    cfg.MODEL.BACKBONE.NAME = "build_dcnv2_resnet_backbone"  # dilated res5 does not fit FPN
    bottom_up = build_backbone(cfg)
    assert len(bottom_up.res4) == 23
    assert (
        bottom_up.res4[0].conv2.groups == 32 and bottom_up.res4[0].conv2.out_channels == 512
    )  # 32x4d: 128 at res2, doubled per stage
    assert bottom_up.res5[0].conv2.dilation == (2, 2)
    assert bottom_up.output_shape()["res5"].stride == 16
    # FREEZE_AT=2 freezes the stem and res2 (and turns their BN into FrozenBN), not res3.
    assert not any(p.requires_grad for p in bottom_up.stem.parameters())
    assert not any(p.requires_grad for p in bottom_up.res2.parameters())
    assert all(p.requires_grad for p in bottom_up.res3.parameters())
    assert len(_deform_layers(bottom_up)) == 4 + 23 + 3


def test_backend_key_reaches_every_deformable_conv():
    cfg = _cfg()
    cfg.MODEL.DCNV2.BACKEND = "torchvision"
    bottom_up = build_backbone(cfg).bottom_up
    backends = {m.backend for m in bottom_up.modules() if isinstance(m, ModulatedDeformConv)}
    assert backends == {"torchvision"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(depth=34), "depth 34"),
        (dict(deform_on_per_stage=(True, True)), "4 booleans"),
        (dict(res5_dilation=3), "res5_dilation"),
    ],
)
def test_make_dcnv2_stages_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_dcnv2_stages(**kwargs)
