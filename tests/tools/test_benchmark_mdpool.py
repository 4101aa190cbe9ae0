"""dcnv2.tools.benchmark_mdpool and tools/benchmark_mdpool.py on a tiny input (no timing)."""

import importlib.util
import json
import os

import pytest
import torch

from dcnv2.errors import UserInputError
from dcnv2.tools.benchmark_mdpool import METHODS, benchmark_mdpool, format_table, random_boxes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tool_times_every_method_side_by_side(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "dcnv2_tool_benchmark_mdpool", os.path.join(ROOT, "tools", "benchmark_mdpool.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "m.json"
    argv = ["--rois", "30", "--height", "96", "--width", "160", "--channels", "4"]
    assert tool.main(argv + ["--fc-dim", "8", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["results"]) == list(METHODS)
    assert sum(result["rois_per_level"]) == 30 and result["channels"] == 4
    base = result["results"]["ROIAlignV2"]
    assert base["forward_ratio"] == 1.0 and base["forward_backward_ratio"] == 1.0
    for r in result["results"].values():
        assert r["forward_s"] > 0 and r["forward_backward_s"] > 0
        assert r["forward_ratio"] == pytest.approx(r["forward_s"] / base["forward_s"])
    printed = capsys.readouterr().out
    assert printed.strip().endswith(format_table(result))
    assert printed.splitlines()[0].split()[:3] == ["method", "fwd", "ms"]


def test_without_roialign_there_are_no_ratios():
    result = benchmark_mdpool(
        rois=5, height=64, width=64, channels=2, fc_dim=4, repeats=1, methods=["mdpool op (cpp)"]
    )
    assert "forward_ratio" not in result["results"]["mdpool op (cpp)"]
    assert format_table(result).splitlines()[2].split()[-1] == "-"


def test_random_boxes_lie_inside_the_image_with_the_stated_sizes():
    boxes = random_boxes(500, 800, 1216, seed=3)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 1216).all() and (boxes[:, 3] <= 800).all()
    size = (w * h).sqrt()
    assert size.min() >= 16 * 0.99 and size.max() <= 800 * 1.01
    assert ((h / w) >= 0.49).all() and ((h / w) <= 2.01).all()
    assert torch.equal(boxes, random_boxes(500, 800, 1216, seed=3))


def test_bad_arguments_are_clear_errors():
    with pytest.raises(UserInputError, match="--repeats >= 1"):
        benchmark_mdpool(repeats=0)
    with pytest.raises(UserInputError, match="unknown \\['roialign'\\]"):
        benchmark_mdpool(methods=["roialign"])


def test_the_tool_offers_the_benchmarks_methods():
    """tools/benchmark_mdpool.py names the methods itself (its --help imports no torch)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "benchmark_mdpool.py"
    spec = importlib.util.spec_from_file_location("benchmark_mdpool_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.METHODS == METHODS
    assert tool.parse_args([]).methods == list(METHODS)
