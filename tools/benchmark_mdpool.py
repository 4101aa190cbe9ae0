#!/usr/bin/env python
r"""Speed of modulated deformable RoI pooling (mdpool) against detectron2's ROIAlignV2 pooler on
CPU: forward and forward+backward for RoIs on the FPN maps (p2-p5) of one image, the methods
side by side in one run. Logic: dcnv2.tools.benchmark_mdpool.

Examples:
    python tools/benchmark_mdpool.py --json mdpool.json
    python tools/benchmark_mdpool.py --rois 300 --height 512 --width 768 --repeats 3
"""

import sys

from dcnv2.tools.benchmark_mdpool import METHODS, benchmark_mdpool, format_table
from dcnv2.tools.cli import run_cli, tool_parser
from dcnv2.tools.timing import write_json


def parse_args(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("--rois", type=int, default=1000, help="RoIs (default 1000)")
    parser.add_argument("--height", type=int, default=800, help="image height (default 800)")
    parser.add_argument("--width", type=int, default=1216, help="image width (default 1216)")
    parser.add_argument("--channels", type=int, default=256, help="FPN channels (default 256)")
    parser.add_argument("--fc-dim", type=int, default=1024, help="mdpool fc width (default 1024)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), help=f"any of {list(METHODS)} (default all)"
    )
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = benchmark_mdpool(
        rois=args.rois,
        height=args.height,
        width=args.width,
        channels=args.channels,
        fc_dim=args.fc_dim,
        repeats=args.repeats,
        methods=args.methods,
    )
    print(format_table(result, markdown=args.markdown))
    if args.json:
        write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="benchmark_mdpool.py"))
