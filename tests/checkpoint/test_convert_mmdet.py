"""MMDetection -> detectron2 conversion, against checkpoints with MMDetection's exact tensor
names and shapes (built by mmdet_reference.py from MMDetection's model definitions) and random
values: the converted weights load into the plugin's model with nothing missing or unexpected,
tensors land where they belong, and the converted model computes what MMDetection's layers
compute (backbone + FPN, RPN head, box head, mask head, anchors, box decoding, RoI levels)."""

import importlib.util
import os
import stat

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.poolers import assign_boxes_to_levels
from detectron2.structures import Boxes

import dcnv2
from dcnv2.checkpoint import DCNv2Checkpointer, UnsafeCheckpointError
from dcnv2.checkpoint.convert_mmdet import (
    conversion_report,
    convert_mmdet_checkpoint,
    convert_mmdet_state_dict,
)
from dcnv2.checkpoint.weights_io import ConversionError

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def _import(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _import("mmdet_reference", os.path.join(HERE, "mmdet_reference.py"))
FASTER = "mmdet/faster_rcnn_R50_mdconv_FPN_1x_mmdet.yaml"
MASK = "mmdet/mask_rcnn_R50_mdconv_FPN_1x_mmdet.yaml"
# The native backend, so the deformable conv is not the torchvision op the reference uses.
CPU = ["MODEL.DEVICE", "cpu", "MODEL.DCNV2.BACKEND", "native"]


class _RunsCode:
    """Unpickling this calls os.mkdir(path): a stand-in for a payload that runs code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


class _HistoryBuffer:
    """Stands for the training-state objects of an mmengine checkpoint (its message hub)."""


def _opts(spec):
    return [x for pair in spec.overrides() for x in pair]


@pytest.fixture(scope="module")
def mask_rcnn():
    """(MMDetection stand-in, its state dict, converted weights, spec, loaded plugin model)."""
    torch.manual_seed(0)
    mmdet = ref.randomize_(ref.mdconv_c3_c5(mask=True))
    state_dict = mmdet.state_dict()
    weights, spec = convert_mmdet_state_dict(state_dict)
    model = build_model(dcnv2.get_cfg(MASK, CPU + _opts(spec))).eval()
    incompatible = model.load_state_dict(weights, strict=False)
    return mmdet, state_dict, weights, spec, model, incompatible


def test_reference_schema_has_mmdetections_tensor_counts():
    # By hand: R50 = stem conv + BN (5 with num_batches_tracked) + 16 blocks x (3 conv + 3 BN)
    # + 4 projection shortcuts x (conv + BN) + 13 mdconv blocks x conv_offset (w, b) = 344;
    # FPN 16, RPN 6, Shared2FCBBoxHead 8; FCNMaskHead 12.
    assert len(ref.mdconv_c3_c5().state_dict()) == 344 + 16 + 6 + 8
    assert len(ref.mdconv_c3_c5(mask=True).state_dict()) == 344 + 16 + 6 + 8 + 12


def test_mask_rcnn_loads_with_nothing_missing_or_unexpected(mask_rcnn):
    _, state_dict, weights, spec, model, incompatible = mask_rcnn
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
    assert set(weights) == set(model.state_dict())
    # every tensor but the BN counters was carried over
    assert len(weights) == len([k for k in state_dict if not k.endswith("num_batches_tracked")])
    assert spec.mask_on and spec.num_classes == 80 and spec.deform_modulated
    assert spec.deform_on_per_stage == (False, True, True, True) and spec.deform_num_groups == 1


def test_tensors_land_in_the_right_place(mask_rcnn):
    _, sd, _, _, model, _ = mask_rcnn
    body = model.backbone.bottom_up
    assert torch.equal(
        body.res4[2].conv2_offset.weight, sd["backbone.layer3.2.conv2.conv_offset.weight"]
    )
    assert torch.equal(
        body.res4[2].conv2_offset.bias, sd["backbone.layer3.2.conv2.conv_offset.bias"]
    )
    assert torch.equal(body.res3[0].conv2.weight, sd["backbone.layer2.0.conv2.weight"])
    assert torch.equal(
        body.res2[0].shortcut.norm.running_var, sd["backbone.layer1.0.downsample.1.running_var"]
    )
    assert torch.equal(body.stem.conv1.norm.bias, sd["backbone.bn1.bias"])
    assert torch.equal(model.backbone.fpn_lateral3.weight, sd["neck.lateral_convs.1.conv.weight"])
    assert torch.equal(model.backbone.fpn_output5.bias, sd["neck.fpn_convs.3.conv.bias"])
    cls = model.roi_heads.box_predictor.cls_score
    # background: row 80 (the last) in MMDetection's fc_cls and in detectron2's cls_score
    assert cls.weight.shape[0] == 81
    assert torch.equal(cls.weight[80], sd["roi_head.bbox_head.fc_cls.weight"][80])
    assert torch.equal(cls.bias[80], sd["roi_head.bbox_head.fc_cls.bias"][80])
    assert torch.equal(
        model.roi_heads.mask_head.deconv.weight, sd["roi_head.mask_head.upsample.weight"]
    )


def test_backbone_fpn_and_rpn_head_compute_what_mmdetection_computes(mask_rcnn):
    mmdet, _, _, _, model, _ = mask_rcnn
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = mmdet.neck(mmdet.backbone(x))
        got = model.backbone(x)
        names = ["p2", "p3", "p4", "p5", "p6"]
        for name, e in zip(names, expected):
            assert got[name].shape == e.shape
            torch.testing.assert_close(got[name], e, rtol=1e-4, atol=1e-4 * e.abs().max().item())
        objectness, deltas = model.proposal_generator.rpn_head([got[n] for n in names])
        for level, e in enumerate(expected):
            e_cls, e_reg = mmdet.rpn_head(e)
            torch.testing.assert_close(objectness[level], e_cls, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(deltas[level], e_reg, rtol=1e-4, atol=1e-4)


def test_offsets_matter_in_that_comparison(mask_rcnn):
    # Guard against a vacuous comparison: zeroing the offset convs changes the output.
    mmdet, _, _, _, model, _ = mask_rcnn
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    conv = model.backbone.bottom_up.res4[0].conv2_offset
    saved = conv.weight.detach().clone(), conv.bias.detach().clone()
    with torch.no_grad():
        before = model.backbone(x)["p4"]
        conv.weight.zero_()
        conv.bias.zero_()
        after = model.backbone(x)["p4"]
        conv.weight.copy_(saved[0])
        conv.bias.copy_(saved[1])
    assert (before - after).abs().max() > 1e-3 * before.abs().max()


def test_box_and_mask_heads_compute_what_mmdetection_computes(mask_rcnn):
    mmdet, _, _, _, model, _ = mask_rcnn
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        box_feats = torch.randn(5, 256, 7, 7, generator=g)
        e_cls, e_reg = mmdet.roi_head.bbox_head(box_feats)
        scores, deltas = model.roi_heads.box_predictor(model.roi_heads.box_head(box_feats))
        torch.testing.assert_close(scores, e_cls, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(deltas, e_reg, rtol=1e-4, atol=1e-5)
        mask_feats = torch.randn(3, 256, 14, 14, generator=g)
        e_mask = mmdet.roi_head.mask_head(mask_feats)
        got = model.roi_heads.mask_head.layers(mask_feats)
        assert got.shape == e_mask.shape == (3, 80, 28, 28)
        torch.testing.assert_close(got, e_mask, rtol=1e-4, atol=1e-5)


def test_anchors_match_mmdetections_anchor_generator(mask_rcnn):
    model = mask_rcnn[4]
    sizes = [(24, 32), (12, 16), (6, 8), (3, 4), (2, 2)]
    features = [torch.zeros(1, 256, h, w) for h, w in sizes]
    got = model.proposal_generator.anchor_generator(features)
    for (h, w), stride, boxes in zip(sizes, (4, 8, 16, 32, 64), got):
        torch.testing.assert_close(boxes.tensor, ref.anchors(stride, h, w), rtol=0, atol=1e-4)


def test_box_decoding_matches_mmdetections_coder_with_its_stds(mask_rcnn):
    model = mask_rcnn[4]
    g = torch.Generator().manual_seed(4)
    xy = torch.rand(50, 2, generator=g) * 300
    rois = torch.cat([xy, xy + 8 + torch.rand(50, 2, generator=g) * 200], dim=1)
    # within the log-scale clamp, where both decoders are defined the same way
    deltas = torch.randn(50, 4 * 80, generator=g)
    got = model.roi_heads.box_predictor.box2box_transform.apply_deltas(deltas, rois)
    expected = ref.delta2bbox(rois, deltas, (0.1, 0.1, 0.2, 0.2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    rpn_deltas = torch.randn(50, 4, generator=g)
    got = model.proposal_generator.box2box_transform.apply_deltas(rpn_deltas, rois)
    expected = ref.delta2bbox(rois, rpn_deltas, (1.0, 1.0, 1.0, 1.0))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_rois_go_to_the_feature_levels_mmdetection_uses():
    g = torch.Generator().manual_seed(5)
    xy = torch.rand(400, 2, generator=g) * 400
    wh = torch.exp(torch.rand(400, 2, generator=g) * 6.5) + 1  # 2 to ~670 px sides
    boxes = torch.cat([xy, xy + wh], dim=1)
    scale = (wh[:, 0] * wh[:, 1]).sqrt()
    # away from the level boundaries, where the two epsilons could disagree
    away = torch.stack([(scale / b - 1).abs() > 1e-3 for b in (112, 224, 448)]).all(0)
    got = assign_boxes_to_levels([Boxes(boxes)], 2, 5, 224, 4)
    assert torch.equal(got[away], ref.map_roi_levels(boxes)[away])
    assert set(got.tolist()) == {0, 1, 2, 3}


def _save_mmdet_checkpoint(path, model, meta=None, legacy_offsets=False):
    state_dict = model.state_dict()
    if legacy_offsets:  # the pre-v2 names mmcv still upgrades: layerX.Y.conv2_offset
        state_dict = {
            k.replace("conv2.conv_offset", "conv2_offset"): v for k, v in state_dict.items()
        }
    torch.save({"meta": meta or {}, "state_dict": state_dict}, path)
    return state_dict


V3_META = {
    "mmdet_version": "3.3.0",
    "dataset_meta": {"classes": tuple(f"class{i}" for i in range(80))},
    "cfg": "model = dict(type='FasterRCNN', data_preprocessor=dict(type='DetDataPreprocessor', "
    "mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True, "
    "pad_size_divisor=32), backbone=dict(type='ResNet', depth=50, style='pytorch', "
    "dcn=dict(type='DCNv2', deform_groups=1, fallback_on_stride=False)), "
    "roi_head=dict(bbox_head=dict(bbox_coder=dict(target_means=[0.0, 0.0, 0.0, 0.0], "
    "target_stds=[0.1, 0.1, 0.2, 0.2]))))",
}


def test_faster_rcnn_file_converts_and_loads_through_the_checkpointer(tmp_path):
    mmdet = ref.randomize_(ref.mdconv_c3_c5(), seed=7)
    src, out = str(tmp_path / "mmdet.pth"), str(tmp_path / "d2.pth")
    sd = _save_mmdet_checkpoint(src, mmdet, V3_META, legacy_offsets=True)
    umask = os.umask(0o022)
    try:
        spec = convert_mmdet_checkpoint(src, out)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644  # as any file the user creates
    assert spec.preprocessing_source == "meta config" and not spec.mask_on
    saved = torch.load(out, weights_only=True)  # safe to read back
    assert saved["classes"][:2] == ["class0", "class1"]
    cfg = dcnv2.get_cfg(FASTER, CPU + saved["config_overrides"])
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    model = build_model(cfg)
    DCNv2Checkpointer(model).load(out)
    assert set(saved["model"]) == set(model.state_dict())
    torch.testing.assert_close(
        model.backbone.bottom_up.res5[1].conv2_offset.weight,
        sd["backbone.layer4.1.conv2_offset.weight"],
    )
    assert "configs/mmdet/faster_rcnn_R50_mdconv_FPN_1x_mmdet.yaml" in conversion_report(spec, out)


def test_resnext_with_four_deformable_groups_and_caffe_style_meta(tmp_path):
    mmdet = ref.randomize_(ref.mdconv_c3_c5(deform_groups=4, groups=32, base_width=4))
    meta = {
        "config": "img_norm_cfg = dict(mean=[103.53, 116.28, 123.675], std=[1.0, 1.0, 1.0], "
        "to_rgb=False)\nmodel = dict(backbone=dict(type='ResNeXt', style='caffe', "
        "dcn=dict(type='DCNv2', deform_groups=4, fallback_on_stride=False)))"
    }
    weights, spec = convert_mmdet_state_dict(mmdet.state_dict(), meta)
    overrides = dict(spec.overrides())
    assert overrides["MODEL.RESNETS.NUM_GROUPS"] == "32"
    assert overrides["MODEL.RESNETS.WIDTH_PER_GROUP"] == "4"
    assert overrides["MODEL.RESNETS.DEFORM_NUM_GROUPS"] == "4"
    assert overrides["MODEL.RESNETS.STRIDE_IN_1X1"] == "True"
    assert overrides["INPUT.FORMAT"] == "BGR"
    assert overrides["MODEL.PIXEL_STD"] == "[1.0, 1.0, 1.0]"
    model = build_model(dcnv2.get_cfg(FASTER, CPU + _opts(spec)))
    incompatible = model.load_state_dict(weights, strict=False)
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []


def test_dcn_v1_checkpoint_computes_the_same_features():
    mmdet = ref.TwoStageDetector(
        dcn=dict(deform_groups=1, modulated=False), stage_with_dcn=(False, True, True, True)
    )
    mmdet = ref.randomize_(mmdet, seed=11)
    weights, spec = convert_mmdet_state_dict(mmdet.state_dict())
    assert dict(spec.overrides())["MODEL.RESNETS.DEFORM_MODULATED"] == "False"
    model = build_model(dcnv2.get_cfg(FASTER, CPU + _opts(spec))).eval()
    model.load_state_dict(weights)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        expected = mmdet.backbone(x)[2]
        got = model.backbone.bottom_up(x)["res4"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_offset_channels_that_fit_dcn_and_dcnv2_need_the_meta_or_the_option():
    # 108 = 27 x 4 (DCNv2, 4 groups: MMDetection's group4 model) = 18 x 6 (DCN, 6 groups)
    state_dict = ref.mdconv_c3_c5(deform_groups=4).state_dict()
    with pytest.raises(ConversionError, match="--deform-modulated"):
        convert_mmdet_state_dict(state_dict)
    _, spec = convert_mmdet_state_dict(state_dict, deform_modulated=True)
    assert spec.deform_modulated and spec.deform_num_groups == 4
    _, spec = convert_mmdet_state_dict(
        state_dict, {"cfg": "dcn=dict(type='DCNv2', deform_groups=4)"}
    )
    assert spec.deform_modulated and spec.deform_num_groups == 4
    with pytest.raises(ConversionError, match="cannot be DCN"):
        convert_mmdet_state_dict(ref.mdconv_c3_c5().state_dict(), deform_modulated=False)


def test_without_meta_the_defaults_are_assumed_and_said(tmp_path):
    _, spec = convert_mmdet_state_dict(ref.mdconv_c3_c5().state_dict())
    assert spec.preprocessing_source == "defaults"
    assert "assumed MMDetection's defaults" in conversion_report(spec, str(tmp_path / "d2.pth"))
    assert dict(spec.overrides())["MODEL.PIXEL_MEAN"] == "[123.675, 116.28, 103.53]"


def _broken(edit):
    sd = dict(ref.mdconv_c3_c5().state_dict())
    edit(sd)
    return sd


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            lambda sd: sd.update({"roi_head.bbox_head.shared_convs.0.conv.weight": torch.zeros(3)}),
            "shared_convs.0.conv.weight",
        ),
        (
            lambda sd: sd.update({"roi_head.bbox_head.fc_reg.weight": torch.zeros(4 * 79, 1024)}),
            "fc_reg.weight: (316, 1024), expected (320, 1024)",
        ),
        (lambda sd: sd.pop("neck.fpn_convs.2.conv.bias"), "missing: neck.fpn_convs.2.conv.bias"),
        (
            lambda sd: sd.update({"neck.fpn_convs.4.conv.weight": torch.zeros(256, 2048, 3, 3)}),
            "neck.fpn_convs.4.conv.weight",
        ),
        (
            lambda sd: sd.update({"backbone.stem.0.weight": sd.pop("backbone.conv1.weight")}),
            "ResNet-D",
        ),
        (
            lambda sd: [
                sd.pop(k) for k in list(sd) if k.startswith("backbone.layer3.1.conv2.conv_offset")
            ],
            "layer3 has offset convs in 5 of 6 blocks",
        ),
        (
            lambda sd: sd.update(
                {k[len("roi_head.") :]: sd.pop(k) for k in list(sd) if k.startswith("roi_head.")}
            ),
            "upgrade_model_version.py",
        ),
    ],
    ids=["unknown-tensor", "shape", "missing", "extra-fpn-conv", "resnet-d", "partial-dcn", "v1"],
)
def test_what_cannot_be_converted_is_listed(edit, expected):
    with pytest.raises(ConversionError) as info:
        convert_mmdet_state_dict(_broken(edit))
    assert expected in str(info.value)


def test_tool_prints_the_overrides_and_refuses_a_tampered_file(tmp_path, capsys):
    tool = _import("convert_mmdet_to_d2", os.path.join(REPO, "tools", "convert_mmdet_to_d2.py"))
    src, out = str(tmp_path / "mmdet.pth"), str(tmp_path / "d2.pth")
    _save_mmdet_checkpoint(src, ref.mdconv_c3_c5(mask=True))
    assert tool.main([src, out]) == 0
    printed = capsys.readouterr().out
    for expected in (
        "MODEL.RESNETS.STRIDE_IN_1X1 False",
        "INPUT.FORMAT RGB",
        "MODEL.ROI_HEADS.NUM_CLASSES 80",
        "MODEL.MASK_ON True",
        "'[123.675, 116.28, 103.53]'",
        "mask_rcnn_R50_mdconv_FPN_1x_mmdet.yaml",
    ):
        assert expected in printed
    # an existing output is kept unless --overwrite
    before = os.path.getmtime(out)
    assert tool.main([src, out]) == 2 and "--overwrite" in capsys.readouterr().err
    assert os.path.getmtime(out) == before

    bad, bad_out = str(tmp_path / "bad.pth"), str(tmp_path / "bad_d2.pth")
    torch.save({"meta": {"x": _RunsCode(tmp_path / "code_ran")}, "state_dict": {}}, bad)
    assert tool.main([bad, bad_out]) == 2
    err = capsys.readouterr().err
    assert "Refusing to load" in err and "--allow-unsafe" in err
    assert not os.path.exists(tmp_path / "code_ran") and not os.path.exists(bad_out)


def test_unsafe_refusal_comes_before_any_output(tmp_path):
    src = str(tmp_path / "training_state.pth")
    state = {"state_dict": ref.mdconv_c3_c5().state_dict(), "message_hub": _HistoryBuffer()}
    torch.save(state, src)
    with pytest.raises(UnsafeCheckpointError, match="_HistoryBuffer"):
        convert_mmdet_checkpoint(src, str(tmp_path / "out.pth"))
    assert not os.path.exists(tmp_path / "out.pth")
    spec = convert_mmdet_checkpoint(src, str(tmp_path / "out.pth"), allow_unsafe=True)
    assert spec.num_classes == 80
