"""dcnv2.tools.plot_metrics and tools/plot_metrics.py on synthetic metrics.json files."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from dcnv2.tools.cli import UserInputError
from dcnv2.tools.plot_metrics import MetricsWarning, default_keys, load_metrics, metric_series

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "plot_metrics.py")


def _write_run(folder, scale=1.0, bad_lines=()):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for it in range(19, 200, 20):
        loss = scale * (2.0 - it / 200)
        lines.append(
            json.dumps(
                {
                    "iteration": it,
                    "total_loss": loss,
                    "loss_cls": loss / 2,
                    "loss_box_reg": loss / 4,
                    "lr": 0.02 * min(1.0, (it + 1) / 100),
                    "time": 0.5,
                }
            )
        )
        if it in (99, 199):  # evaluation rows, as detectron2 writes them
            lines.append(
                json.dumps(
                    {"iteration": it, "bbox/AP": it / 10, "bbox/AP50": it / 5, "bbox/APs": 1}
                )
            )
    lines.extend(bad_lines)
    (folder / "metrics.json").write_text("\n".join(lines) + "\n")
    return folder / "metrics.json"


def test_load_skips_malformed_lines_with_a_warning(tmp_path):
    path = _write_run(
        tmp_path / "a", bad_lines=['{"iteration": 200, "total_lo', "[1, 2]", '{"x": 1}']
    )
    with pytest.warns(MetricsWarning, match="skipped 3 malformed line"):
        records = load_metrics(str(path))
    assert len(records) == 12
    iterations, values = metric_series(records, "bbox/AP")
    assert iterations == [99, 199] and values == [9.9, 19.9]
    assert default_keys([records]) == [
        "total_loss",
        "loss_box_reg",
        "loss_cls",
        "lr",
        "bbox/AP",
        "bbox/AP50",
    ]


def test_last_record_wins_and_non_numbers_are_dropped():
    records = [
        {"iteration": 5, "total_loss": 3.0},
        {"iteration": 1, "total_loss": 9.0},
        {"iteration": 5, "total_loss": 2.0, "lr": "n/a"},
        {"iteration": 7, "total_loss": float("nan")},
    ]
    assert metric_series(records, "total_loss") == ([1, 5], [9.0, 2.0])
    assert metric_series(records, "lr") == ([], [])


def test_missing_or_empty_files_are_clear_errors(tmp_path):
    with pytest.raises(UserInputError, match="cannot read metrics file"):
        load_metrics(str(tmp_path / "nope.json"))
    (tmp_path / "empty.json").write_text("garbage\n")
    with pytest.warns(MetricsWarning), pytest.raises(UserInputError, match="no metrics record"):
        load_metrics(str(tmp_path / "empty.json"))


def _tool():
    spec = importlib.util.spec_from_file_location("dcnv2_tool_plot", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_runs_in_one_figure(tmp_path, capsys):
    a = _write_run(tmp_path / "mdconv", scale=0.9, bad_lines=['{"iteration": 3'])
    b = _write_run(tmp_path / "baseline")
    out = tmp_path / "plot.png"
    tool = _tool()
    assert tool.main([str(a), str(b.parent), "--labels", "a", "b", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "2 run(s), 6 panel(s)" in captured.out
    assert "skipped 1 malformed line" in captured.err
    width, height = Image.open(out).size
    assert width > 1000 and height > 500
    with pytest.raises(UserInputError, match="exists"):
        tool.main([str(a), "--out", str(out)])
    with pytest.raises(UserInputError, match="--labels has 1"):
        tool.main([str(a), str(b), "--labels", "x", "--out", str(tmp_path / "p2.png")])
    with pytest.raises(UserInputError, match="none of the metrics"):
        tool.main([str(a), "--keys", "segm/AP", "--out", str(tmp_path / "p3.png")])
    assert tool.main([str(a), "--keys", "lr", "--out", str(tmp_path / "p4.png")]) == 0
    assert "1 panel(s) (lr)" in capsys.readouterr().out


def test_cli_missing_file_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, TOOL, str(tmp_path / "missing.json"), "--out", str(tmp_path / "p.png")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("plot_metrics.py: error: cannot read metrics file")
    assert len(result.stderr.strip().splitlines()) == 1
