#!/usr/bin/env python
r"""Plot losses, learning rate and evaluation AP over iterations from detectron2 metrics.json
files; several runs in one figure for comparison. --stats: training-time statistics.

Examples:
    python tools/plot_metrics.py output/metrics.json --out curves.png
    python tools/plot_metrics.py out_mdconv/ out_baseline/ --labels mdconv baseline \
        --out compare.png --keys total_loss lr bbox/AP
    python tools/plot_metrics.py output/quick/faster_rcnn_R50_mdconv_FPN_instant/ --stats \
        --json train_time.json

--stats prints, per run, s/iter (mean, median, std, p90 over the logged records, each the median
of its window), the slowest records, the training time they account for, and the ETA logged at
each record against the time the rest of the run took (dcnv2.tools.plot_metrics).

A folder stands for the metrics.json inside it. Malformed lines (for example the last line of a
run still writing) are skipped with a warning.
"""

import json
import os
import sys
import warnings

from dcnv2.errors import UserInputError
from dcnv2.tools.cli import add_force_argument, run_cli, tool_parser
from dcnv2.tools.plot_metrics import (
    MetricsWarning,
    format_train_time,
    load_metrics,
    plot_runs,
    train_time_stats,
)


def parse_args(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("metrics", nargs="+", help="metrics.json files (or their folders)")
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: folder)")
    parser.add_argument("--out", help="the PNG to write")
    parser.add_argument("--stats", action="store_true", help="print training-time statistics")
    parser.add_argument("--json", help="--stats: also write them to this JSON file")
    parser.add_argument("--keys", nargs="+", help="metrics to plot (default: losses, lr, APs)")
    parser.add_argument("--columns", type=int, default=3, help="panels per row (default 3)")
    parser.add_argument("--dpi", type=int, default=100, help="resolution (default 100)")
    add_force_argument(parser, "--out (and --json) if it exists")
    return parser.parse_args(argv)


def _label(path: str) -> str:
    path = os.path.abspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    return os.path.basename(folder)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.labels and len(args.labels) != len(args.metrics):
        raise UserInputError(
            f"--labels has {len(args.labels)} label(s) for {len(args.metrics)} metrics file(s)"
        )
    if not args.out and not args.stats:
        raise UserInputError("nothing to do: give --out PNG (curves) and/or --stats")
    if args.json and not args.stats:
        raise UserInputError("--json writes the --stats statistics: add --stats")
    for path in (args.out, args.json):
        if path and os.path.exists(path) and not args.force:
            raise UserInputError(f"{path!r} exists; pass --force to overwrite it")
    labels = args.labels or [_label(p) for p in args.metrics]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricsWarning)
        runs = [(label, load_metrics(path)) for label, path in zip(labels, args.metrics)]
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if args.stats:
        stats = [(label, train_time_stats(records)) for label, records in runs]
        print(format_train_time(stats))
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump([{"run": label, **s} for label, s in stats], f, indent=2)
            print(f"wrote {args.json}")
    if args.out:
        drawn = plot_runs(runs, args.out, keys=args.keys, columns=args.columns, dpi=args.dpi)
        print(f"{len(runs)} run(s), {len(drawn)} panel(s) ({', '.join(drawn)}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="plot_metrics.py"))
