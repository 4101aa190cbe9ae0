"""dcnv2.tools.visualize_sampling and tools/visualize_sampling.py: tracing sampling locations
back through stacked deformable layers."""

import importlib.util
import itertools
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dcnv2.errors import UserInputError
from dcnv2.tools.cli import setup_cfg
from dcnv2.tools.demo import DemoRunner
from dcnv2.tools.visualize_sampling import (
    DeformableLayerRecord,
    record_deformable_layers,
    sample_image,
    trace_sampling_locations,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["MODEL.WEIGHTS", "", "INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "224"]


def _layer(offset=(0.0, 0.0), mask=0.5, size=(5, 7), stride=1, in_stride=32, dilation=1):
    """A 3x3 layer with the same (dy, dx) offset at every tap and position; ``mask`` is a float
    or 9 per-tap values."""
    off = torch.tensor(offset, dtype=torch.float64).repeat(9)[:, None, None].expand(18, *size)
    m = torch.as_tensor(mask, dtype=torch.float64).expand(9).reshape(9, 1, 1).expand(9, *size)
    return DeformableLayerRecord(
        name="l",
        offset=off.clone(),
        mask=m.clone(),
        kernel_size=(3, 3),
        stride=(stride, stride),
        padding=(dilation, dilation),
        dilation=(dilation, dilation),
        in_stride=in_stride,
    )


def _multiset(points):
    return sorted(map(tuple, np.round(np.asarray(points), 9).tolist()))


def test_zero_offsets_give_the_regular_dilated_grid_exactly():
    c = torch.tensor([[64.0, 96.0]])  # (y, x) on the stride-32 grid
    locations, weights = trace_sampling_locations([_layer() for _ in range(3)], c)
    assert locations.shape == (1, 729, 2) and weights.shape == (1, 729)
    taps = list(itertools.product((-1, 0, 1), repeat=2))
    expected = [
        (64 + 32 * (a[0] + b[0] + d[0]), 96 + 32 * (a[1] + b[1] + d[1]))
        for a, b, d in itertools.product(taps, repeat=3)
    ]
    assert _multiset(locations[0]) == _multiset(expected)
    # 49 distinct points: a 7x7 grid of step 32 centred on c (with multiplicities).
    assert len(set(_multiset(locations[0]))) == 49
    assert torch.equal(weights, torch.full((1, 729), 0.125, dtype=torch.float64))


def test_constant_offset_shifts_every_point_by_the_expected_amount():
    c = torch.tensor([[64.0, 96.0], [100.0, 50.0]])
    base, _ = trace_sampling_locations([_layer() for _ in range(3)], c)
    shifted, _ = trace_sampling_locations([_layer(offset=(0.25, -0.5)) for _ in range(3)], c)
    # Each of the 3 layers adds (0.25, -0.5) cells of its stride-32 input.
    expected = base + torch.tensor([3 * 32 * 0.25, 3 * 32 * -0.5], dtype=torch.float64)
    assert torch.allclose(shifted, expected, atol=1e-9)


def test_weights_are_products_of_the_masks_along_each_path():
    per_tap = torch.arange(1, 10, dtype=torch.float64) / 10
    layers = [_layer(mask=per_tap), _layer(mask=per_tap.flip(0))]
    locations, weights = trace_sampling_locations(layers, torch.tensor([[64.0, 64.0]]))
    # Index = last-layer tap * 9 + first-layer tap (the last layer is the outer loop).
    for outer, inner in itertools.product(range(9), repeat=2):
        w = weights[0, outer * 9 + inner]
        assert torch.isclose(w, per_tap.flip(0)[outer] * per_tap[inner])
        dy = (outer // 3 - 1) + (inner // 3 - 1)
        dx = (outer % 3 - 1) + (inner % 3 - 1)
        assert torch.equal(
            locations[0, outer * 9 + inner],
            torch.tensor([64.0, 64.0]) + 32 * torch.tensor([dy, dx]),
        )


def test_strided_and_dilated_layers():
    # A stride-2 conv reading a stride-16 map, then a dilation-2 conv at stride 32.
    layers = [_layer(stride=2, in_stride=16, size=(9, 9)), _layer(dilation=2, size=(5, 5))]
    locations, _ = trace_sampling_locations(layers, torch.tensor([[64.0, 32.0]]))
    taps = list(itertools.product((-1, 0, 1), repeat=2))
    expected = [
        (64 + 64 * a[0] + 16 * b[0], 32 + 64 * a[1] + 16 * b[1])
        for a, b in itertools.product(taps, repeat=2)
    ]
    assert _multiset(locations[0]) == _multiset(expected)


def test_bad_points_shape():
    with pytest.raises(ValueError, match=r"\(P, 2\)"):
        trace_sampling_locations([_layer()], torch.zeros(3))


@pytest.fixture(scope="module")
def model_and_cfg():
    cfg = setup_cfg("faster_rcnn_R50_mdconv_FPN_1x.yaml", TINY, confidence_threshold=0.0)
    return DemoRunner(cfg).predictor.model, cfg


def _image(h=150, w=181):
    return np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_hooks_record_what_the_op_receives(model_and_cfg):
    model, cfg = model_and_cfg
    block = model.backbone.bottom_up.res4[2]
    with torch.no_grad():
        bias = block.conv2_offset.bias
        saved = bias.clone()
        bias[:18] = 0.75  # offsets
        bias[18:] = 1.5  # mask logits
    try:
        with record_deformable_layers(model) as records, torch.no_grad():
            model([{"image": torch.zeros(3, 96, 128), "height": 96, "width": 128}])
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    assert [r.name for r in records][:2] == ["res3.0.conv2", "res3.1.conv2"]
    assert len(records) == 13  # res3-res5: 4 + 6 + 3
    assert [r.in_stride for r in records] == [8] * 4 + [16] * 6 + [32] * 3
    assert [r.out_stride for r in records] == [8] * 4 + [16] * 6 + [32] * 3
    hit = records[4 + 2]
    assert hit.name == "res4.2.conv2" and hit.offset.shape == (18, 6, 8)
    assert torch.allclose(hit.offset, torch.full_like(hit.offset, 0.75))
    assert torch.allclose(hit.mask, torch.full_like(hit.mask, torch.sigmoid(torch.tensor(1.5))))
    assert torch.count_nonzero(records[0].offset) == 0


def test_sample_image_on_an_untrained_model_gives_the_grid(model_and_cfg):
    model, cfg = model_and_cfg
    image = _image()
    result = sample_image(model, cfg, image, points_xy=[(90.0, 75.0)], num_layers=2)
    scale = result["scale"]
    assert result["image_rgb"].shape[0] == 160 and scale == pytest.approx(160 / 150)
    assert result["layers"] == ["res5.1.conv2", "res5.2.conv2"]
    y, x = 75 * scale, 90 * scale
    expected = [
        (y + 32 * (a + b), x + 32 * (c + d))
        for a, b, c, d in itertools.product((-1, 0, 1), repeat=4)
    ]
    assert _multiset(result["locations"][0]) == _multiset(expected)
    assert np.allclose(result["weights"], 0.25)  # sigmoid(0) ** 2
    # The same in the input's pixels, as the tool draws them: the point exactly as given.
    assert np.array_equal(result["input_points"], [[75.0, 90.0]])
    assert np.array_equal(result["input_image_rgb"], image[:, :, ::-1])
    assert np.allclose(result["input_locations"][0] * scale, result["locations"][0])
    assert _multiset(result["input_locations"][0] * scale) == _multiset(expected)
    with pytest.raises(UserInputError, match="--layers"):
        sample_image(model, cfg, image, points_xy=[(1.0, 1.0)], num_layers=14)
    with pytest.raises(UserInputError, match="outside"):
        sample_image(model, cfg, image, points_xy=[(181.0, 1.0)])


def test_tool_draws_box_centres_with_random_offsets(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "dcnv2_tool_vis", os.path.join(ROOT, "tools", "visualize_sampling.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    Image.fromarray(_image()).save(tmp_path / "in.png")
    out = tmp_path / "s.png"
    argv = ["--input", str(tmp_path / "in.png"), "--output", str(out), "--max-boxes", "2"]
    argv += ["--confidence-threshold", "0", "--random-offsets", "0.5", "--opts", *TINY]
    assert tool.main(argv) == 0
    assert "2 query point(s) x 729 sampling locations" in capsys.readouterr().out
    assert Image.open(out).size[0] > 500
    with pytest.raises(UserInputError, match="exists"):
        tool.main(argv)
