#!/usr/bin/env python
"""Training-time cost of R-CNN feature mimicking: seconds per iteration with and without it.

Both variants are the same config and the same random weights; "off" is the plain detector
(GeneralizedRCNN + DCNv2StandardROIHeads, MODEL.DCNV2.MIMIC.ENABLED False). One iteration is
forward, backward and an SGD step on a fixed synthetic batch (random images, random boxes); the
two variants' iterations alternate in rounds, so that both see the same minutes of the host.
Also reported: how many crops the R-CNN branch ran through the backbone per iteration, and the
overhead per crop.
Logic: dcnv2.tools.benchmark_mimic.

Examples:
    python tools/benchmark_mimic.py --height 320 --width 480 --iters 5 --json mimic.json
    python tools/benchmark_mimic.py --opts MODEL.DCNV2.MIMIC.CROP_SIZE 128
"""

import argparse
import sys

from dcnv2.tools.benchmark_mimic import benchmark_mimic, format_table
from dcnv2.tools.cli import run_cli, tool_parser
from dcnv2.tools.timing import write_json

DEFAULT_CONFIG = "faster_rcnn_R50_mdconv_mdpool_mimic_FPN_1x.yaml"


def parse_args(argv=None):
    parser = tool_parser(__doc__, skip=2)
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, help="a mimic config")
    parser.add_argument("--height", type=int, default=320, help="image height (default 320)")
    parser.add_argument("--width", type=int, default=480, help="image width (default 480)")
    parser.add_argument("--batch", type=int, default=2, help="images per batch (default 2)")
    parser.add_argument("--boxes", type=int, default=8, help="GT boxes per image (default 8)")
    parser.add_argument(
        "--iters", type=int, default=5, help="timed rounds of one iteration each (default 5)"
    )
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ..."
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = benchmark_mimic(
        args.config_file,
        args.opts,
        height=args.height,
        width=args.width,
        batch=args.batch,
        boxes=args.boxes,
        iters=args.iters,
    )
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="benchmark_mimic.py"))
