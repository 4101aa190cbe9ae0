"""dcnv2.benchmark.ops and tools/benchmark_ops.py on a tiny shape (no speed asserted)."""

import importlib.util
import json
import os

import pytest

from dcnv2.benchmark import ops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Small enough for a test; odd sizes on purpose.
TINY = "tiny=1,4,9,7"


def _tool():
    spec = importlib.util.spec_from_file_location(
        "dcnv2_tool_benchmark_ops", os.path.join(ROOT, "tools", "benchmark_ops.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_benchmark_runs_on_a_tiny_shape(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    argv = ["--shapes", TINY, "--repeats", "1", "--threads", "1", "--out", str(out)]
    assert _tool().main(argv + ["--plot", str(png)]) == 0
    rows = json.loads(out.read_text())
    methods = {r["method"] for r in rows}
    assert {"conv2d", "native", "torchvision"} <= methods and out.exists() and png.exists()
    assert all(r["forward_s"] > 0 and r["forward_backward_s"] > 0 for r in rows)
    assert "| tiny" in ops.format_table(rows)
    assert ops.format_table(rows) in capsys.readouterr().out
    for r in rows:
        assert r["size"] == [1, 4, 9, 7] and r["peak_mib"] >= 0
        conv2d = next(c for c in rows if c["method"] == "conv2d")
        assert r["forward_vs_conv2d"] == pytest.approx(r["forward_s"] / conv2d["forward_s"])


def test_shapes_by_name_or_size():
    assert ops.parse_shape("res4") == ("res4", (2, 256, 50, 76))
    assert ops.parse_shape("mine=1,2,3,4") == ("mine", (1, 2, 3, 4))
    for bad in ("nope", "x=1,2,3", "x=1,2,3,0", "=1,2,3,4", "x=a,b,c,d"):
        with pytest.raises(ValueError, match="NAME=N,C,H,W"):
            ops.parse_shape(bad)


def test_bad_shape_is_one_error_line(capsys):
    from dcnv2.utils.cli import run_cli

    assert run_cli(_tool().main, ["--shapes", "x=1,2"], prog="benchmark_ops.py") == 2
    err = capsys.readouterr().err
    assert err.startswith("benchmark_ops.py: error: shape 'x=1,2'") and len(err.splitlines()) == 1


def test_table_cells_and_missing_reference():
    row = dict(
        shape="s",
        size=[1, 2, 3, 4],
        method="native",
        forward_s=0.5,
        forward_backward_s=2.0,
        peak_mib=10.4,
        forward_vs_conv2d=1.25,
        forward_backward_vs_conv2d=2.5,
    )
    lines = ops.format_table([row]).splitlines()
    assert lines[0].startswith("| shape | method | fwd (s) | fwd+bwd (s) | peak MiB |")
    assert lines[1] == "|" + "---|" * 10
    assert lines[2] == "| s (1, 2, 3, 4) | native | 0.500 | 2.000 | 10 | 1.25 | 2.50 | - | - | - |"
