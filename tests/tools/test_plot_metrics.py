"""dcnv2.tools.plot_metrics and tools/plot_metrics.py on synthetic metrics.json files: curves, and
training-time statistics (--stats) of iteration times and ETAs checked against numpy."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dcnv2.errors import UserInputError
from dcnv2.tools.cli import run_cli
from dcnv2.tools.plot_metrics import (
    MetricsWarning,
    default_keys,
    draw_runs,
    load_metrics,
    metric_series,
    train_time_stats,
)

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


def test_a_one_record_run_is_drawn_as_a_point():
    """A line through one point draws nothing: a run that logged one record gets a marker."""
    short = [{"iteration": 19, "total_loss": 1.5, "lr": 0.01}]
    long = [{"iteration": i, "total_loss": 2.0 - i / 100, "lr": 0.02} for i in range(19, 99, 20)]
    fig, drawn = draw_runs([("short", short), ("long", long)])
    assert drawn == ["total_loss", "lr"]
    for ax, key in zip(fig.axes, drawn):
        (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "short"]
        assert list(line.get_xdata()) == [19] and list(line.get_ydata()) == [short[0][key]]
        assert line.get_marker() not in (None, "None", "", " ") and line.get_markersize() > 0
        (other,) = [ln for ln in ax.get_lines() if ln.get_label() == "long"]
        assert other.get_marker() in (None, "None", "", " ")  # dense curves stay lines
    import matplotlib.pyplot as plt

    plt.close(fig)


MAX_ITER = 200
ITERATIONS = list(range(19, MAX_ITER, 20))  # detectron2 writes every 20 iterations
TIMES = [0.9, 0.5, 0.52, 0.48, 0.6, 0.55, 1.2, 0.5, 0.51, 0.49]
# What detectron2 would predict from the current s/iter alone, plus a bias at one record.
ETAS = [t * (MAX_ITER - i - 1) + (30.0 if i == 59 else 0.0) for i, t in zip(ITERATIONS, TIMES)]


@pytest.fixture
def metrics(tmp_path):
    lines = [json.dumps({"iteration": 99, "time": 5.0, "eta_seconds": 1.0})]  # replaced on resume
    for i, t, eta in zip(ITERATIONS, TIMES, ETAS):
        lines.append(json.dumps({"iteration": i, "time": t, "eta_seconds": eta, "data_time": t / 10,
                                 "total_loss": 1.0}))  # fmt: skip
    lines.append(json.dumps({"iteration": 199, "bbox/AP": 40.0}))  # the final evaluation
    path = tmp_path / "run" / "metrics.json"
    path.parent.mkdir()
    path.write_text("\n".join(lines) + "\n")
    return path


def _remaining(k):
    """Seconds the records after record k took: each its s/iter x the iterations it covers."""
    total = 0.0
    for j in range(k + 1, len(ITERATIONS)):
        total += (ITERATIONS[j] - ITERATIONS[j - 1]) * TIMES[j]
    return total


def test_statistics_match_an_independent_computation(metrics):
    stats = train_time_stats(load_metrics(str(metrics)))
    times = np.array(TIMES)
    s = stats["s_per_iter"]
    assert stats["records"] == 10
    assert (stats["first_iteration"], stats["last_iteration"]) == (19, 199)
    assert s["mean"] == pytest.approx(times.mean())
    assert s["median"] == pytest.approx(np.median(times))
    assert s["std"] == pytest.approx(times.std())
    assert s["p90"] == pytest.approx(np.percentile(times, 90))
    assert (s["min"], s["max"]) == (min(TIMES), max(TIMES))
    assert stats["data_time_mean"] == pytest.approx(times.mean() / 10)
    order = np.argsort(-times, kind="stable")[:5]
    assert stats["slowest"] == [{"iteration": ITERATIONS[k], "s_per_iter": TIMES[k]} for k in order]
    assert stats["total_seconds"] == pytest.approx(20 * times.sum())
    assert [e["iteration"] for e in stats["eta"]] == ITERATIONS
    relative = []
    for k, e in enumerate(stats["eta"]):
        actual = _remaining(k)
        assert e["actual_seconds"] == pytest.approx(actual)
        assert e["predicted_seconds"] == ETAS[k]
        assert e["error_seconds"] == pytest.approx(ETAS[k] - actual)
        if actual > 0:
            assert e["relative_error"] == pytest.approx((ETAS[k] - actual) / actual)
            relative.append(abs(ETAS[k] - actual) / actual)
        else:
            assert e["relative_error"] is None  # the last record: nothing left
    assert stats["eta_mean_abs_relative_error"] == pytest.approx(np.mean(relative))
    assert stats["finished"]


def test_eta_accuracy_needs_a_finished_run(metrics):
    """A run stopped early (preempted) did not take the time its ETAs predicted."""
    records = load_metrics(str(metrics))
    assert train_time_stats(records)["finished"]
    stopped = [r for r in records if r["iteration"] <= 139]
    stats = train_time_stats(stopped)
    assert not stats["finished"] and stats["eta_mean_abs_relative_error"] is None
    assert stats["eta"][-1]["predicted_seconds"] == ETAS[6] and stats["last_iteration"] == 139


def test_tool_prints_tables_and_writes_json(metrics, tmp_path, capsys):
    tool = _tool()
    out = tmp_path / "stats.json"
    argv = [str(metrics.parent), "--stats", "--json", str(out)]
    assert run_cli(tool.main, argv) == 0
    printed = capsys.readouterr().out
    assert "s/iter mean" in printed and "slowest records of run" in printed
    assert f"| {np.mean(TIMES):.4f} " in printed  # as formatted, not re-parsed
    assert "ETA of run" in printed
    (written,) = json.loads(out.read_text())
    assert written["run"] == "run"
    assert written["slowest"][0] == {"iteration": 139, "s_per_iter": 1.2}
    assert run_cli(tool.main, argv, prog="plot_metrics.py") == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err
    assert run_cli(tool.main, [str(metrics)], prog="plot_metrics.py") == 2
    assert "nothing to do" in capsys.readouterr().err


def test_metrics_without_times_are_a_clear_error():
    with pytest.raises(UserInputError, match="no record has 'time'"):
        train_time_stats([{"iteration": 0, "bbox/AP": 1.0}])
