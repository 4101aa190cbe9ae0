#!/usr/bin/env python
r"""Model-level speed and memory: inference and training iterations of several configs, each in
a process of its own, as a table with ratios to the first config.

Random-init weights and fixed random images; the last layers of the RPN head and of the box
predictor are zeroed so every model does the same work in its heads. The configs of a mode take
turns, one run each per round (so all see the same minutes of the host); times are medians of
--repeats rounds after --warmup untimed ones. Peak RSS is each process's peak resident memory
during its runs (reset after the model is built), weights and libraries included.
Details: dcnv2/tools/benchmark.py.

Examples:
    python tools/benchmark.py                      # R50-FPN baseline vs the seed mdconv config
    python tools/benchmark.py --height 512 --width 768 --modes inference --repeats 3 \
        --json bench.json
    python tools/benchmark.py --configs faster_rcnn_R50_mdconv_FPN_1x.yaml \
        --opts MODEL.DCNV2.BACKEND torchvision
"""

import argparse
import sys

from dcnv2.tools.benchmark import benchmark, format_table
from dcnv2.tools.cli import run_cli, tool_parser
from dcnv2.tools.timing import write_json

# The baseline first, so the ratios read "mdconv / baseline".
DEFAULT_CONFIGS = ["faster_rcnn_R50_FPN_1x.yaml", "faster_rcnn_R50_mdconv_FPN_1x.yaml"]


def parse_args(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=DEFAULT_CONFIGS,
        help="YAML paths or names of shipped configs; ratios are to the first "
        f"(default: {' '.join(DEFAULT_CONFIGS)})",
    )
    parser.add_argument(
        "--modes", nargs="+", choices=("inference", "train"), default=["inference", "train"]
    )
    parser.add_argument("--height", type=int, default=800, help="image height (default 800)")
    parser.add_argument("--width", type=int, default=1216, help="image width (default 1216)")
    parser.add_argument("--batch-size", type=int, default=2, help="training batch (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides for every config: KEY VALUE ...",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = benchmark(
        args.configs,
        modes=args.modes,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        warmup=args.warmup,
        repeats=args.repeats,
        opts=args.opts,
        seed=args.seed,
        progress=not args.no_progress,
    )
    threads = results[0]["threads"]
    print(
        f"{args.height}x{args.width}, inference batch 1, training batch {args.batch_size}, "
        f"median of {args.repeats} after {args.warmup} warm-up, {threads} threads"
    )
    print(format_table(results))
    busy = [r for r in results if max(r["loadavg"]) > r["cpus"]]
    if busy:
        print(
            f"warning: {len(busy)} run(s) saw a load average above the {busy[0]['cpus']} CPUs: "
            "other processes competed for the CPU, times are inflated"
        )
    if args.json:
        write_json({"args": vars(args), "results": results}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="benchmark.py"))
