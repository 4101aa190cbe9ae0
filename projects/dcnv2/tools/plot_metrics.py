"""Training curves and training-time statistics from detectron2's ``metrics.json``
(``tools/plot_metrics.py``): losses, lr and APs of several runs in one figure, and ``--stats``
(s/iter, slowest records, ETA accuracy; MMDetection's ``cal_train_time``).
"""

import json
import math
import os
import re
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import UserInputError

# Evaluation results worth a panel by default: the main AP of each task and AP50/AP75.
_EVAL_KEY = re.compile(r"^[a-z_]+/AP(50|75)?$")


class MetricsWarning(UserWarning):
    """A line of a metrics file was skipped."""


def load_metrics(path: str) -> List[Dict]:
    """The records of a ``metrics.json`` (or of the one in a folder), in file order; lines without
    an integer ``iteration`` (cut short while training wrote them) are skipped with a warning."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.json")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"cannot read metrics file {path!r}: {e}") from None
    records, skipped = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
            skipped.append(number)
            continue
        records.append(record)
    if skipped:
        shown = ", ".join(map(str, skipped[:5])) + (" ..." if len(skipped) > 5 else "")
        warnings.warn(
            f"{path}: skipped {len(skipped)} malformed line(s) (line {shown}); expected one JSON "
            "object with an integer 'iteration' per line",
            MetricsWarning,
            stacklevel=2,
        )
    if not records:
        raise UserInputError(
            f"{path!r} has no metrics record (expected detectron2's metrics.json: one JSON object "
            "with 'iteration' per line)"
        )
    return records


def metric_series(records: Sequence[Dict], key: str) -> Tuple[List[int], List[float]]:
    """``(iterations, values)`` of one scalar, sorted; a repeated iteration's last record wins
    (a resumed run); non-numeric and non-finite values are left out."""
    by_iteration: Dict[int, float] = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                by_iteration[record["iteration"]] = float(value)
    iterations = sorted(by_iteration)
    return iterations, [by_iteration[i] for i in iterations]


def default_keys(runs: Sequence[Sequence[Dict]]) -> List[str]:
    """Panels to draw: ``total_loss``, each ``loss_*``, ``lr``, then the evaluation APs."""
    present = {key for records in runs for record in records for key in record}
    losses = sorted(k for k in present if k.startswith("loss_"))
    evals = sorted(k for k in present if _EVAL_KEY.match(k))
    head = [k for k in ("total_loss",) if k in present]
    lr = [k for k in ("lr",) if k in present]
    return head + losses + lr + evals


def draw_runs(
    runs: Sequence[Tuple[str, Sequence[Dict]]],
    keys: Optional[Sequence[str]] = None,
    columns: int = 3,
):
    """One panel per metric (default :func:`default_keys`), one line per ``(label, records)`` run.

    Returns:
        (figure, drawn): the matplotlib figure and the metrics drawn, in panel order.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(keys) if keys else default_keys([records for _, records in runs])
    drawn = [k for k in keys if any(metric_series(r, k)[0] for _, r in runs)]
    if not drawn:
        available = sorted(default_keys([r for _, r in runs]))
        raise UserInputError(
            f"none of the metrics {list(keys)} is in the runs; available: {available}"
        )
    rows = math.ceil(len(drawn) / columns)
    cols = min(columns, len(drawn))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, drawn):
        for index, (label, records) in enumerate(runs):
            iterations, values = metric_series(records, key)
            if not iterations:
                continue
            # Evaluations are few points, and a line through one point draws nothing: mark them.
            marker = "o" if "/" in key or len(iterations) == 1 else None
            ax.plot(
                iterations,
                values,
                label=label,
                color=f"C{index}",  # the run's colour in every panel, whichever it misses
                marker=marker,
                markersize=4,
                linewidth=1.2,
            )
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in list(axes.flat)[len(drawn) :]:
        ax.axis("off")
    legend = {}  # one entry per run, whichever panels it appears in
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if len(runs) > 1 or runs[0][0]:
        fig.legend(
            list(legend.values()),
            list(legend),
            loc="upper center",
            ncol=min(len(legend), 4),
            bbox_to_anchor=(0.5, 1.0),
            frameon=False,
        )
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.0 * rows)))
    else:
        fig.tight_layout()
    return fig, drawn


def plot_runs(
    runs: Sequence[Tuple[str, Sequence[Dict]]],
    path: str,
    keys: Optional[Sequence[str]] = None,
    columns: int = 3,
    dpi: int = 100,
) -> List[str]:
    """:func:`draw_runs` saved as a PNG at ``path``; returns the metrics drawn."""
    import matplotlib.pyplot as plt

    fig, drawn = draw_runs(runs, keys, columns)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return drawn


def train_time_stats(records: Sequence[Dict], slowest: int = 5) -> Dict:
    """Statistics of one run's iteration times.

    Each record's ``time`` is the median s/iter since the previous record. The logged
    ``eta_seconds`` is compared with the time the later records took (meaningful when finished).

    Returns:
        dict: ``s_per_iter`` (``mean``, ``median``, ``std``, ``p90``, ``min``, ``max``),
        ``slowest``, ``total_seconds``, ``eta`` rows, ``finished``, ``eta_mean_abs_relative_error``
        and record counts.
    """
    iterations, times = metric_series(records, "time")
    if not iterations:
        raise UserInputError(
            "no record has 'time' (seconds per iteration): expected the metrics.json of a "
            "training run"
        )
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
    # detectron2 logs an ETA of 0 at max_iter - 1.
    finished = bool(eta) and eta[-1]["predicted_seconds"] < times[-1]
    relative = [abs(e["relative_error"]) for e in eta if e["relative_error"] is not None]
    _, data_times = metric_series(records, "data_time")
    by_time = sorted(zip(times, iterations), key=lambda p: (-p[0], p[1]))
    return {
        "records": len(iterations),
        "first_iteration": iterations[0],
        "last_iteration": iterations[-1],
        "s_per_iter": {
            "mean": float(np.mean(times)),
            "median": float(np.median(times)),
            "std": float(np.std(times)),
            "p90": float(np.percentile(times, 90)),
            "min": min(times),
            "max": max(times),
        },
        "data_time_mean": float(np.mean(data_times)) if data_times else None,
        "slowest": [{"iteration": i, "s_per_iter": t} for t, i in by_time[:slowest]],
        "total_seconds": sum(spans),
        "eta": eta,
        "finished": finished,
        "eta_mean_abs_relative_error": float(np.mean(relative)) if relative and finished else None,
    }


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(abs(seconds), 3600)
    text = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"-{text}" if seconds < 0 else text


def _table(rows, headers) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def format_train_time(runs: Sequence[Sequence], eta_rows: int = 5) -> str:
    """Console tables of ``(label, stats)`` pairs: runs, slowest records, ETA against actual."""
    summary = []
    for label, s in runs:
        t = s["s_per_iter"]
        eta_error = s["eta_mean_abs_relative_error"]
        eta_text = "-" if eta_error is None else f"{100 * eta_error:.1f}%"
        if s["eta"] and not s["finished"]:
            eta_text = "- (unfinished run)"
        summary.append(
            [label, f"{s['first_iteration']}-{s['last_iteration']}"]
            + [f"{t[k]:.4f}" for k in ("mean", "median", "std", "p90")]
            + ["-" if s["data_time_mean"] is None else f"{s['data_time_mean']:.4f}"]
            + [_duration(s["total_seconds"]), eta_text]
        )
    header = ["run", "iterations", "s/iter mean", "median", "std", "p90", "data s/iter"]
    parts = [_table(summary, header + ["train time", "ETA abs error"])]
    for label, s in runs:
        slow = [[label, e["iteration"], f"{e['s_per_iter']:.4f}"] for e in s["slowest"]]
        parts.append(
            f"slowest records of {label}:\n" + _table(slow, ["run", "iteration", "s/iter"])
        )
        eta = s["eta"]
        if eta and s["finished"]:
            rows = [
                [
                    e["iteration"],
                    _duration(e["predicted_seconds"]),
                    _duration(e["actual_seconds"]),
                    "-" if e["relative_error"] is None else f"{100 * e['relative_error']:+.1f}%",
                ]
                for e in eta[:: max(1, len(eta) // eta_rows)]
            ]
            parts.append(
                f"ETA of {label} (predicted at the iteration vs the time the rest took):\n"
                + _table(rows, ["iteration", "ETA", "actual", "error"])
            )
    return "\n\n".join(parts)
