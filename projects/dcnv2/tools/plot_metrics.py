"""Training curves from detectron2's ``metrics.json``: losses, learning rate and evaluation AP
over iterations, several runs in one figure. The logic of ``tools/plot_metrics.py``.

``metrics.json`` is written by detectron2's ``JSONWriter``: one JSON object per line, with
``iteration`` and the (already median-smoothed) scalars of that iteration: ``total_loss``,
``loss_*``, ``lr``, ``time``..., and after an evaluation ``bbox/AP``, ``bbox/AP50``...
"""

import json
import math
import os
import re
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

from .cli import UserInputError

__all__ = ["MetricsWarning", "load_metrics", "metric_series", "default_keys", "plot_runs"]

# Evaluation results worth a panel by default: the main AP of each task and AP50/AP75.
_EVAL_KEY = re.compile(r"^[a-z_]+/AP(50|75)?$")


class MetricsWarning(UserWarning):
    """A line of a metrics file was skipped."""


def load_metrics(path: str) -> List[Dict]:
    """The records of a ``metrics.json`` (or of the one in a folder), in file order.

    Lines that are not a JSON object with an integer ``iteration`` (a line cut short while
    training was writing it, a stray print) are skipped with a :class:`MetricsWarning`.

    Raises:
        UserInputError: the file is missing or unreadable, or has no usable record.
    """
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
    """``(iterations, values)`` of one scalar, sorted by iteration.

    When an iteration appears more than once (a resumed run rewrites it), the last record wins.
    Non-numeric and non-finite values are left out.
    """
    by_iteration: Dict[int, float] = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                by_iteration[record["iteration"]] = float(value)
    iterations = sorted(by_iteration)
    return iterations, [by_iteration[i] for i in iterations]


def default_keys(runs: Sequence[Sequence[Dict]]) -> List[str]:
    """Panels to draw for these runs: ``total_loss``, each ``loss_*``, ``lr``, then the
    evaluation APs (``bbox/AP``, ``bbox/AP50``, ``bbox/AP75``, same for ``segm``...)."""
    present = set()
    for records in runs:
        for record in records:
            present.update(record)
    losses = sorted(k for k in present if k.startswith("loss_"))
    evals = sorted(k for k in present if _EVAL_KEY.match(k))
    head = [k for k in ("total_loss",) if k in present]
    lr = [k for k in ("lr",) if k in present]
    return head + losses + lr + evals


def plot_runs(
    runs: Sequence[Tuple[str, Sequence[Dict]]],
    path: str,
    keys: Optional[Sequence[str]] = None,
    columns: int = 3,
    dpi: int = 100,
) -> List[str]:
    """One panel per metric, one line per run; saved as a PNG.

    Args:
        runs: ``(label, records)`` per run, records from :func:`load_metrics`.
        path: output PNG.
        keys: metrics to draw (default: :func:`default_keys`).
        columns: panels per row.
        dpi: resolution.

    Returns:
        list[str]: the metrics drawn.

    Raises:
        UserInputError: none of ``keys`` is in any run.
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
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, drawn):
        for index, (label, records) in enumerate(runs):
            iterations, values = metric_series(records, key)
            if not iterations:
                continue
            # Evaluations are few points: mark them; training scalars are dense lines.
            marker = "o" if "/" in key else None
            ax.plot(
                iterations,
                values,
                label=label,
                color=colours[index % len(colours)],
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
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if len(runs) > 1 or runs[0][0]:
        fig.legend(
            handles,
            labels,
            loc="upper center",
            ncol=min(len(labels), 4),
            bbox_to_anchor=(0.5, 1.0),
            frameon=False,
        )
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.0 * rows)))
    else:
        fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return drawn
