"""dcnv2.tools.export_model and tools/export_model.py: ONNX detector and backbone in onnxruntime
(DeformConv nodes, dynamic sizes, decomposed form), traced detector."""

import importlib.util
import os

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from dcnv2.layers import ModulatedDeformRoIAlign
from dcnv2.tools.cli import setup_cfg
from dcnv2.tools.export_model import (
    BackboneForExport,
    ExportError,
    compare_detections,
    deform_backend,
    detector_outputs,
    export_backbone_onnx,
    export_detector_onnx,
    onnx_detections,
    onnx_operators,
    onnx_session,
    relative_errors,
    run_onnx,
    trace_detector,
)
from dcnv2.tools.visualize_sampling import randomize_offsets

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def model_and_image():
    opts = ["MODEL.WEIGHTS", "", "MODEL.RPN.POST_NMS_TOPK_TEST", "50"]
    cfg = setup_cfg("faster_rcnn_R50_mdconv_FPN_1x.yaml", opts, confidence_threshold=0.0)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = torch.randint(0, 256, (3, 96, 128), generator=torch.Generator().manual_seed(1))
    image = image.float()
    # Non-zero offsets and varied masks, so the deformable sampling is really exercised.
    assert randomize_offsets(model, [{"image": image}], offset_rms=0.7) == 13
    # Random heads give saturated scores (many exact ties) and boxes that amplify rounding
    # ~100x; smaller class and box weights give spread scores and boxes near the proposals.
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(0.05)
        model.roi_heads.box_predictor.bbox_pred.weight.mul_(0.1)
    return model, image


def _image(h, w, seed):
    return torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed)).float()


# Two sizes, multiples of the FPN's size divisibility (32), neither square nor of one aspect.
SIZES = [(96, 128), (160, 96)]


def test_onnx_backbone_has_standard_ops_and_matches_pytorch(model_and_image, tmp_path):
    model, image = model_and_image
    path = str(tmp_path / "backbone.onnx")
    names = export_backbone_onnx(model, image[None], path)
    assert names == ["p2", "p3", "p4", "p5", "p6"]
    assert all(domain in ("", "ai.onnx") for domain, _ in onnx_operators(path))
    assert onnx_operators(path)[("", "DeformConv")] == 13
    # One file, two input sizes (dynamic height and width).
    for h, w in SIZES:
        x = _image(h, w, seed=h)[None]
        with torch.no_grad():
            expected = BackboneForExport(model).eval()(x)
        got = run_onnx(path, x.numpy())
        assert [g.shape for g in got] == [tuple(e.shape) for e in expected]
        for g, e in zip(got, expected):
            e = e.numpy()
            assert np.abs(g - e).max() <= 1e-4 * np.abs(e).max()


def test_decomposed_backbone_has_no_deformconv_and_matches_pytorch(model_and_image, tmp_path):
    model, image = model_and_image
    path = str(tmp_path / "decomposed.onnx")
    export_backbone_onnx(model, image[None], path, deform_op="decomposed")
    ops = onnx_operators(path)
    assert all(domain in ("", "ai.onnx") for domain, _ in ops)
    assert ("", "DeformConv") not in ops and ops[("", "GatherElements")] > 0
    with torch.no_grad():
        expected = BackboneForExport(model).eval()(image[None])
    assert max(relative_errors(run_onnx(path, image[None].numpy()), expected)) <= 1e-4


def _gap_threshold(scores, near=15, min_gap=2e-3):
    """A score threshold in the middle of a gap of at least ``min_gap`` between consecutive
    scores, near the ``near``-th one: detections cannot cross it by float rounding."""
    s = scores.sort(descending=True).values
    for i in sorted(range(len(s) - 1), key=lambda i: abs(i - near)):
        if s[i] - s[i + 1] >= min_gap:
            return float(s[i] + s[i + 1]) / 2
    raise AssertionError("no gap in the scores")


def test_onnx_detector_has_13_deformconv_and_gives_the_pytorch_detections(
    model_and_image, tmp_path
):
    model, image = model_and_image
    path = str(tmp_path / "detector.onnx")
    names, adapter = export_detector_onnx(model, image, path)
    assert names == ["pred_boxes", "pred_classes", "scores", "image_size"]
    ops = onnx_operators(path)
    assert ops[("", "DeformConv")] == 13  # c3-c5 of R-50: 4 + 6 + 3
    assert all(domain in ("", "ai.onnx") for domain, _ in ops)
    session = onnx_session(path)
    for h, w in SIZES:
        x = _image(h, w, seed=h + 7)
        got = onnx_detections(session, adapter, x)
        with torch.no_grad():
            expected = model.inference([{"image": x}], do_postprocess=False)[0]
        assert tuple(got.image_size) == (h, w)
        threshold = _gap_threshold(expected.scores)
        stats = compare_detections(got, expected, threshold)
        assert stats["count"] == stats["count_other"] >= 5 and stats["unmatched"] == 0
        assert stats["max_box_diff"] <= 1e-2 and stats["max_score_diff"] <= 1e-3


def test_compare_detections_finds_differences():
    from detectron2.structures import Boxes, Instances

    def inst(scores, classes, boxes):
        return Instances(
            (50, 50),
            scores=torch.tensor(scores),
            pred_classes=torch.tensor(classes),
            pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
        )

    a = inst([0.9, 0.5, 0.1], [1, 2, 3], [[0, 0, 5, 5], [1, 1, 9, 9], [2, 2, 4, 4]])
    # Equal up to near-tied scores listed in the other order.
    b = inst([0.5, 0.9], [2, 1], [[1, 1, 9, 9.004], [0, 0, 5, 5]])
    stats = compare_detections(b, a, 0.2)
    assert stats["count"] == 2 and stats["unmatched"] == 0
    assert stats["max_box_diff"] == pytest.approx(0.004, abs=1e-6)
    c = inst([0.9, 0.5], [1, 4], [[0, 0, 5, 5], [1, 1, 9, 9]])
    assert compare_detections(c, a, 0.2)["unmatched"] == 1
    assert compare_detections(a, a, 0.0)["count"] == 3


def test_agreement_tolerance_follows_the_image_size():
    """Float32 agreement of two runtimes passes (2.43e-2 px at 320x480, as onnxruntime gave on
    random-init weights); a box off by a pixel, a missing detection or a wrong class fails."""
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(100, 2, generator=g) * torch.tensor([400.0, 250.0])
    boxes = torch.cat([xy, xy + 10 + 60 * torch.rand(100, 2, generator=g)], dim=1)
    scores = torch.linspace(0.99, 0.06, 100)
    classes = torch.arange(100) % 80

    def inst(boxes, scores=scores, classes=classes):
        return Instances((320, 480), scores=scores, pred_classes=classes, pred_boxes=Boxes(boxes))

    expected = inst(boxes)
    shifted = boxes.clone()
    shifted[17, 2] += 2.43e-2
    stats = compare_detections(inst(shifted), expected, 0.05)
    assert stats["max_box_diff"] == pytest.approx(2.43e-2, rel=1e-3)
    assert stats["agree"] and stats["box_tolerance"] == pytest.approx(0.096)
    shifted[17, 2] += 1.0
    assert not compare_detections(inst(shifted), expected, 0.05)["agree"]
    keep = torch.arange(100) != 42
    missing = inst(boxes[keep], scores[keep], classes[keep])
    assert not compare_detections(missing, expected, 0.05)["agree"]
    wrong = classes.clone()
    wrong[5] = 79 if wrong[5] != 79 else 78
    stats = compare_detections(inst(boxes, classes=wrong), expected, 0.05)
    assert stats["unmatched"] == 1 and not stats["agree"]


def test_mdpool_model_is_refused():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1), ModulatedDeformRoIAlign(output_size=7, in_channels=4)
    )
    with pytest.raises(ExportError, match="deformable RoI pooling"):
        export_detector_onnx(model, torch.zeros(3, 64, 64), "unused.onnx")
    with pytest.raises(ExportError, match="deformable RoI pooling"):
        export_backbone_onnx(model, torch.zeros(1, 3, 64, 64), "unused.onnx")


def _sorted(instances):
    rows = torch.cat(
        [
            instances.scores[:, None],
            instances.pred_classes[:, None].float(),
            instances.pred_boxes.tensor,
        ],
        dim=1,
    ).numpy()
    # Random weights give many equal scores, whose order NMS may break differently.
    return rows[np.lexsort(rows.T[::-1])]


def test_traced_detector_gives_the_eager_boxes(model_and_image, tmp_path):
    model, image = model_and_image
    inputs = [{"image": image}]
    traced, adapter = trace_detector(model, inputs)
    traced.save(str(tmp_path / "model.ts"))
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    got = detector_outputs(loaded, adapter, inputs)[0]["instances"]
    # The trace runs torchvision's op: the eager model through the same op gives the same boxes.
    with deform_backend(model, "torchvision"), torch.no_grad():
        eager = model(inputs)[0]["instances"]
    assert len(got) == len(eager) > 0
    np.testing.assert_allclose(_sorted(got), _sorted(eager), rtol=1e-4, atol=1e-3)


def test_backends_give_the_same_features(model_and_image):
    """Exporting through torchvision's op changes nothing beyond float32 rounding: the FPN
    features of native and torchvision agree to 1e-5 of their range. (Boxes of this
    random-weight detector amplify such rounding ~100x, so they are not compared across ops.)"""
    model, image = model_and_image
    x = model.preprocess_image([{"image": image}]).tensor
    features = {}
    for backend in ("native", "torchvision"):
        with deform_backend(model, backend), torch.no_grad():
            features[backend] = model.backbone(x)
    for name, native_feature in features["native"].items():
        tv_feature = features["torchvision"][name]
        assert (native_feature - tv_feature).abs().max() <= 1e-5 * native_feature.abs().max()


def test_tool_refuses_bad_sizes_and_existing_files(tmp_path):
    from dcnv2.errors import UserInputError

    spec = importlib.util.spec_from_file_location(
        "dcnv2_tool_export", os.path.join(ROOT, "tools", "export_model.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(UserInputError, match="multiples of 32"):
        tool.main(["--format", "onnx", "--output", str(tmp_path / "x.onnx"), "--height", "100"])
    (tmp_path / "y.ts").write_bytes(b"")
    with pytest.raises(UserInputError, match="exists"):
        tool.main(["--format", "torchscript", "--output", str(tmp_path / "y.ts")])


def _tool():
    spec = importlib.util.spec_from_file_location(
        "dcnv2_tool_export", os.path.join(ROOT, "tools", "export_model.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_tool_refuses_inconsistent_options(tmp_path):
    from dcnv2.errors import UserInputError

    out = str(tmp_path / "x.onnx")
    with pytest.raises(UserInputError, match="--part backbone"):
        _tool().main(["--format", "onnx", "--output", out, "--deform-op", "decomposed"])
    with pytest.raises(UserInputError, match="--benchmark times the ONNX detector"):
        _tool().main(["--format", "torchscript", "--output", out, "--benchmark", "b.json"])


def test_benchmark_times_each_runtime_and_writes_json(model_and_image, tmp_path):
    import json

    from dcnv2.tools.deploy_benchmark import benchmark_runtimes, format_table, write_json

    model, image = model_and_image
    result = benchmark_runtimes(
        model,
        [image],
        str(tmp_path / "unused.onnx"),
        repeats=2,
        warmup=0,
        runtimes=("pytorch_eager", "backbone_eager"),
    )
    assert set(result) == {"pytorch_eager", "backbone_eager", "setup"}
    assert len(result["pytorch_eager"]["times_s"]) == 2
    assert 0 < result["backbone_eager"]["min_s"] <= result["backbone_eager"]["median_s"]
    assert result["setup"]["images"] == [[96, 128]]
    table = format_table(result)
    assert "pytorch_eager" in table and "1.00x" in table and "onnxruntime" not in table
    write_json(result, str(tmp_path / "b.json"))
    assert json.loads((tmp_path / "b.json").read_text())["setup"]["repeats"] == 2
    with pytest.raises(ValueError, match="Unknown runtimes"):
        benchmark_runtimes(model, [image], "unused.onnx", runtimes=("tensorrt",))


@pytest.mark.parametrize(
    "config", ["mask_rcnn_R50_mdconv_FPN_1x.yaml", "retinanet_R50_mdconv_FPN_1x.yaml"]
)
def test_other_detectors_export_with_deformconv(config, tmp_path):
    opts = ["MODEL.WEIGHTS", "", "MODEL.RPN.POST_NMS_TOPK_TEST", "50"]
    cfg = setup_cfg(config, opts, confidence_threshold=0.0)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = _image(160, 96, seed=5)
    assert randomize_offsets(model, [{"image": image}], offset_rms=0.7) == 13
    if hasattr(model, "roi_heads"):
        with torch.no_grad():
            model.roi_heads.box_predictor.cls_score.weight.mul_(0.05)
            model.roi_heads.box_predictor.bbox_pred.weight.mul_(0.1)
    path = str(tmp_path / "detector.onnx")
    names, adapter = export_detector_onnx(model, _image(96, 128, seed=4), path)
    assert onnx_operators(path)[("", "DeformConv")] == 13
    got = onnx_detections(onnx_session(path), adapter, image)
    with torch.no_grad():
        if hasattr(model, "roi_heads"):
            expected = model.inference([{"image": image}], do_postprocess=False)[0]
        else:
            expected = model([{"image": image}])[0]["instances"]
    stats = compare_detections(got, expected, _gap_threshold(expected.scores))
    assert stats["count"] == stats["count_other"] >= 5 and stats["unmatched"] == 0
    assert stats["max_box_diff"] <= 1e-2
    if "pred_masks" in names:
        # The top detection (clearly ahead in score) has the same 28x28 mask.
        top_got, top_expected = got.scores.argmax(), expected.scores.argmax()
        assert got.pred_masks.shape[1:] == (1, 28, 28)
        torch.testing.assert_close(
            got.pred_masks[top_got], expected.pred_masks[top_expected], atol=1e-4, rtol=0
        )
