"""dcnv2.utils.export and tools/export_model.py: ONNX backbone in onnxruntime, traced detector."""

import importlib.util
import os

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from dcnv2.utils.cli import setup_cfg
from dcnv2.utils.export import (
    BackboneForExport,
    deform_backend,
    detector_outputs,
    export_backbone_onnx,
    onnx_operators,
    run_onnx,
    trace_detector,
)
from dcnv2.utils.sampling import randomize_offsets

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
    return model, image


def test_onnx_backbone_has_standard_ops_and_matches_pytorch(model_and_image, tmp_path):
    model, image = model_and_image
    path = str(tmp_path / "backbone.onnx")
    names = export_backbone_onnx(model, image[None], path)
    assert names == ["p2", "p3", "p4", "p5", "p6"]
    assert all(domain in ("", "ai.onnx") for domain, _ in onnx_operators(path))
    with torch.no_grad():
        expected = BackboneForExport(model).eval()(image[None])
    got = run_onnx(path, image[None].numpy())
    assert [g.shape for g in got] == [tuple(e.shape) for e in expected]
    for g, e in zip(got, expected):
        e = e.numpy()
        assert np.abs(g - e).max() <= 1e-4 * np.abs(e).max()


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
    from dcnv2.utils.cli import UserInputError

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
