"""dcnv2.tools.analyze_model and tools/analyze_model.py: deformable convs counted by fvcore."""

import importlib.util
import json
import os

import pytest
import torch
from detectron2.modeling import build_model
from torch import nn

from dcnv2.layers import DeformConv, ModulatedDeformConv, available_backends
from dcnv2.tools.analyze_model import (
    DEFORM_CONV_OPS,
    activation_count_analysis,
    deform_conv_flops,
    flop_count_analysis,
    model_inputs,
)
from dcnv2.tools.cli import setup_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU_BACKENDS = [
    pytest.param(b, marks=pytest.mark.skipif(b not in available_backends("cpu"), reason=b))
    for b in ("torchvision", "native")
]


class _Layer(nn.Module):
    """A deformable conv called with tensors only, so fvcore can trace it."""

    def __init__(self, modulated: bool, backend: str, bias: bool):
        super().__init__()
        cls = ModulatedDeformConv if modulated else DeformConv
        self.conv = cls(8, 6, 3, stride=2, padding=1, groups=2, bias=bias, backend=backend)
        self.modulated = modulated

    def forward(self, x, offset, mask):
        return self.conv(x, offset, mask) if self.modulated else self.conv(x, offset)


def test_formula():
    # N=2, C_in=8, C_out=6, groups=2, 3x3, output 5x6: dense 2*6*4*9*30 = 12960 multiply-adds,
    # sampled values 2*8*9*30 = 4320, each 4 multiply-adds to interpolate (+1 to modulate).
    assert deform_conv_flops((2, 8, 9, 11), (6, 4, 3, 3), (2, 6, 5, 6), True) == 12960 + 5 * 4320
    assert deform_conv_flops((2, 8, 9, 11), (6, 4, 3, 3), (2, 6, 5, 6), False) == 12960 + 4 * 4320


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("modulated", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_single_deformable_conv(backend, modulated, bias):
    layer = _Layer(modulated, backend, bias)
    x, offset, mask = torch.randn(2, 8, 9, 11), torch.randn(2, 18, 5, 6), torch.rand(2, 9, 5, 6)
    flops = flop_count_analysis(layer, (x, offset, mask))
    assert flops.total() == (34560 if modulated else 30240)
    assert dict(flops.by_operator()) == {"deform_conv": flops.total()}
    assert not flops.unsupported_ops()
    assert flops.by_module()["model.conv"] == flops.total()  # the model inside TracingAdapter
    acts = activation_count_analysis(layer, (x, offset, mask))
    assert acts.total() == 2 * 6 * 5 * 6 and not acts.unsupported_ops()


def _detector(config: str, backend: str = "auto"):
    opts = ["MODEL.WEIGHTS", "", "MODEL.RPN.POST_NMS_TOPK_TEST", "40"]
    cfg = setup_cfg(config, opts + ["MODEL.DCNV2.BACKEND", backend])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    # Same proposals in both models (the anchors, equal scores), so the heads cost the same and
    # only the backbones differ.
    head = model.proposal_generator.rpn_head
    for conv in (head.objectness_logits, head.anchor_deltas):
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    return model


def test_seed_model_costs_the_deformable_amount_more_than_the_baseline():
    inputs = model_inputs(128, 160)
    md = flop_count_analysis(_detector("faster_rcnn_R50_mdconv_FPN_1x.yaml"), inputs)
    base = flop_count_analysis(_detector("faster_rcnn_R50_FPN_1x.yaml"), inputs)
    # 13 deformable 3x3 layers at 128x160: (positions, bottleneck channels, layers) per stage.
    # Each adds its offset/mask predictor (a 3x3 conv to 27 channels) and, per sampled value
    # (C * 9 per position), 4 multiply-adds of bilinear interpolation and 1 of modulation.
    stages = [(16 * 20, 128, 4), (8 * 10, 256, 6), (4 * 5, 512, 3)]
    expected = sum(hw * layers * (27 * c * 9 + 5 * c * 9) for hw, c, layers in stages)
    assert expected == 91422720
    assert md.total() - base.total() == expected
    assert md.by_operator()["linear"] == base.by_operator()["linear"] > 0
    assert not set(DEFORM_CONV_OPS) & set(md.unsupported_ops())
    assert md.by_operator()["deform_conv"] > 0 and "deform_conv" not in base.by_operator()


def test_tool(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "dcnv2_tool_analyze", os.path.join(ROOT, "tools", "analyze_model.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "a.json"
    argv = ["--height", "96", "--width", "128", "--tasks", "flop", "parameter", "structure"]
    assert tool.main(argv + ["--max-depth", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "DCNv2BottleneckBlock" in printed and "#flops" in printed
    assert "total parameters: " in printed
    report = json.loads(out.read_text())
    assert report["flop"] > report["flops_by_operator"]["deform_conv"] > 0
    assert not set(DEFORM_CONV_OPS) & set(report["unsupported_ops"])
    assert report["parameter"] == sum(
        p.numel() for p in _detector("faster_rcnn_R50_mdconv_FPN_1x.yaml").parameters()
    )
