"""Training-time statistics (dcnv2.tools.train_time, tools/plot_metrics.py --stats) of a
synthetic metrics.json whose iteration times and ETAs are known, checked against numpy."""

import importlib.util
import json
import os

import numpy as np
import pytest

from dcnv2.tools.cli import UserInputError, run_cli
from dcnv2.tools.plot_metrics import load_metrics
from dcnv2.tools.train_time import train_time_stats

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
    spec = importlib.util.spec_from_file_location(
        "dcnv2_tool_plot_stats", os.path.join(ROOT, "tools", "plot_metrics.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
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
