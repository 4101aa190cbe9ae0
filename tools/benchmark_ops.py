#!/usr/bin/env python
"""Benchmark the deformable-conv backends against conv2d on CPU: forward and forward+backward
time and peak memory at ResNet-50's deformable 3x3 conv shapes; also onnxruntime's DeformConv
(forward only) when onnxruntime and onnx are installed. Each method runs in processes of its
own; their times come from interleaved rounds (each round times every method once), so all
methods see the same minutes of the host.
Logic: dcnv2.tools.benchmark_ops.

Example:
    python tools/benchmark_ops.py --out results.json --plot results.png
    python tools/benchmark_ops.py --shapes res4 small=1,64,32,48 --repeats 3
"""

import sys

from dcnv2.errors import UserInputError
from dcnv2.tools.benchmark_ops import format_table, notes, parse_shape, plot, run
from dcnv2.tools.cli import run_cli, tool_parser
from dcnv2.tools.timing import write_json


def parse_args(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["res3", "res4", "res5"],
        help="shape names (res3, res4, res5: ResNet-50's deformable stages at 800x1216, batch 2)"
        " or NAME=N,C,H,W (default: res3 res4 res5)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--plot", help="draw a PNG bar chart here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        shapes = dict(parse_shape(s) for s in args.shapes)
    except ValueError as e:
        raise UserInputError(str(e)) from None
    if args.repeats < 1 or args.threads < 1:
        raise UserInputError("need --repeats >= 1 and --threads >= 1")
    rows = run(shapes, args.repeats, args.threads)
    print(format_table(rows))
    print("\n".join(notes(rows)))
    if args.out:
        write_json(rows, args.out)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="benchmark_ops.py"))
