"""Training-time statistics from detectron2's ``metrics.json`` (``tools/plot_metrics.py
--stats``; MMDetection's ``analyze_logs.py cal_train_time``).

Each record of ``metrics.json`` holds ``time``: the median seconds per iteration over the
iterations since the previous record (the writer's window, 20 by default; data loading included,
evaluation and checkpoint writing not), and ``eta_seconds``: the remaining time detectron2
predicted at that iteration (median s/iter of the last 1000 iterations x iterations left).

- s/iter: mean, median, standard deviation (population) and 90th percentile (linear
  interpolation) over the records' ``time``;
- the slowest records (their iteration and s/iter);
- the training time the records account for: each record's ``time`` x the iterations since the
  previous one;
- ETA accuracy: at each record, the predicted ``eta_seconds`` against the time the later records
  then took (the same sum, from that record on): error = predicted - actual, relative = error /
  actual. Only for a finished run: one whose last record predicts less than an iteration left
  (a run stopped early, e.g. preempted, did not take the time its ETAs were predicting).
"""

import math
from typing import Dict, Sequence

from .cli import UserInputError
from .plot_metrics import metric_series

__all__ = ["format_train_time", "train_time_stats"]


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    # Linear interpolation between closest ranks (numpy's default).
    position = (len(sorted_values) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def train_time_stats(records: Sequence[Dict], slowest: int = 5) -> Dict:
    """Statistics of one run's iteration times (see the module docstring).

    Args:
        records: the run's ``metrics.json`` records (:func:`dcnv2.tools.plot_metrics.load_metrics`;
            a resumed run's repeated iterations: the last record wins).
        slowest: how many of the slowest records to list.

    Returns:
        dict: ``records``, ``first_iteration``, ``last_iteration``, ``s_per_iter`` (``mean``,
        ``median``, ``std``, ``p90``, ``min``, ``max``), ``data_time_mean`` (or None),
        ``slowest`` (``[{"iteration", "s_per_iter"}]``, slowest first), ``total_seconds``,
        ``eta`` (``[{"iteration", "predicted_seconds", "actual_seconds", "error_seconds",
        "relative_error"}]``, ``relative_error`` None where nothing was left), ``finished``
        (the last record predicts less than an iteration left) and
        ``eta_mean_abs_relative_error`` (over the records with time left; None without any, or
        when the run did not finish).

    Raises:
        UserInputError: no record has ``time`` (not a training run's metrics).
    """
    iterations, times = metric_series(records, "time")
    if not iterations:
        raise UserInputError(
            "no record has 'time' (seconds per iteration): expected the metrics.json of a "
            "training run"
        )
    ordered = sorted(times)
    mean = sum(times) / len(times)
    # Seconds each record stands for: its s/iter x the iterations since the previous record.
    spans = [
        (it - (iterations[k - 1] if k else -1)) * t
        for k, (it, t) in enumerate(zip(iterations, times))
    ]
    remaining = [sum(spans[k + 1 :]) for k in range(len(spans))]
    at = dict(zip(iterations, remaining))
    eta = []
    for iteration, predicted in zip(*metric_series(records, "eta_seconds")):
        if iteration not in at:
            continue
        actual = at[iteration]
        eta.append(
            {
                "iteration": iteration,
                "predicted_seconds": predicted,
                "actual_seconds": actual,
                "error_seconds": predicted - actual,
                "relative_error": (predicted - actual) / actual if actual > 0 else None,
            }
        )
    # Finished: the last ETA leaves less than one iteration (detectron2 logs 0 at max_iter - 1).
    finished = bool(eta) and eta[-1]["predicted_seconds"] < times[-1]
    relative = [abs(e["relative_error"]) for e in eta if e["relative_error"] is not None]
    data_iterations, data_times = metric_series(records, "data_time")
    by_time = sorted(zip(times, iterations), key=lambda p: (-p[0], p[1]))
    return {
        "records": len(iterations),
        "first_iteration": iterations[0],
        "last_iteration": iterations[-1],
        "s_per_iter": {
            "mean": mean,
            "median": _percentile(ordered, 50),
            "std": math.sqrt(sum((t - mean) ** 2 for t in times) / len(times)),
            "p90": _percentile(ordered, 90),
            "min": ordered[0],
            "max": ordered[-1],
        },
        "data_time_mean": sum(data_times) / len(data_times) if data_iterations else None,
        "slowest": [{"iteration": i, "s_per_iter": t} for t, i in by_time[:slowest]],
        "total_seconds": sum(spans),
        "eta": eta,
        "finished": finished,
        "eta_mean_abs_relative_error": (
            sum(relative) / len(relative) if relative and finished else None
        ),
    }


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(abs(seconds), 3600)
    text = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"-{text}" if seconds < 0 else text


def format_train_time(runs: Sequence[Sequence], eta_rows: int = 5) -> str:
    """The statistics of several runs as console tables (tabulate): one row per run, its
    slowest records, and ETA predicted vs actual at about ``eta_rows`` evenly spaced records.

    Args:
        runs: ``(label, stats)`` pairs, stats from :func:`train_time_stats`.
        eta_rows: ETA rows per run.
    """
    from tabulate import tabulate

    summary = []
    for label, s in runs:
        t = s["s_per_iter"]
        eta_error = s["eta_mean_abs_relative_error"]
        eta_text = "-" if eta_error is None else f"{100 * eta_error:.1f}%"
        if s["eta"] and not s["finished"]:
            eta_text = "- (unfinished run)"
        summary.append(
            [
                label,
                f"{s['first_iteration']}-{s['last_iteration']}",
                f"{t['mean']:.4f}",
                f"{t['median']:.4f}",
                f"{t['std']:.4f}",
                f"{t['p90']:.4f}",
                "-" if s["data_time_mean"] is None else f"{s['data_time_mean']:.4f}",
                _duration(s["total_seconds"]),
                eta_text,
            ]
        )
    header = ["run", "iterations", "s/iter mean", "median", "std", "p90", "data s/iter"]
    header += ["train time", "ETA abs error"]
    parts = [tabulate(summary, headers=header, tablefmt="github", disable_numparse=True)]
    for label, s in runs:
        slow = [[label, e["iteration"], f"{e['s_per_iter']:.4f}"] for e in s["slowest"]]
        parts.append(
            f"slowest records of {label}:\n"
            + tabulate(
                slow,
                headers=["run", "iteration", "s/iter"],
                tablefmt="github",
                disable_numparse=True,
            )
        )
        eta = s["eta"]
        if eta and s["finished"]:
            step = max(1, len(eta) // eta_rows)
            rows = [
                [
                    e["iteration"],
                    _duration(e["predicted_seconds"]),
                    _duration(e["actual_seconds"]),
                    "-" if e["relative_error"] is None else f"{100 * e['relative_error']:+.1f}%",
                ]
                for e in eta[::step]
            ]
            parts.append(
                f"ETA of {label} (predicted at the iteration vs the time the rest took):\n"
                + tabulate(
                    rows,
                    headers=["iteration", "ETA", "actual", "error"],
                    tablefmt="github",
                    disable_numparse=True,
                )
            )
    return "\n\n".join(parts)
