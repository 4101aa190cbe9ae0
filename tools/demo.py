#!/usr/bin/env python
r"""Run a detector on images, folders of images or videos and draw what it finds.

Examples:
    python tools/demo.py --input photo.jpg photos/ clip.mp4 --output demo_out/ \
        --json demo_out/detections.json \
        --opts MODEL.WEIGHTS output/quick/faster_rcnn_R50_mdconv_FPN_instant/model_final.pth
    python tools/demo.py --config-file faster_rcnn_R50_mdconv_FPN_1x.yaml \
        --input photo.jpg --output demo_out/ --opts MODEL.WEIGHTS model.pth

Without --config-file the demo reads the config.yaml the training run wrote beside its weights.

Drawings keep the input's file name in --output (videos are written as .mp4); existing files are
never overwritten unless --force. Runs on the CPU unless --opts MODEL.DEVICE cuda.
"""

import sys

from dcnv2.tools.cli import add_config_arguments, run_cli, setup_cfg, tool_parser
from dcnv2.tools.demo import DemoRunner, collect_inputs, run_demo


def parse_args(argv=None):
    parser = add_config_arguments(tool_parser(__doc__), default=None, force="existing output files")
    parser.add_argument(
        "--input", nargs="+", required=True, help="image files, folders of images, video files"
    )
    parser.add_argument("--output", required=True, help="folder for the annotated images/videos")
    parser.add_argument("--json", help="also write the detections as COCO-format JSON here")
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="minimum score of a detection to draw and save (default: 0.5)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    inputs = collect_inputs(args.input)
    cfg = setup_cfg(args.config_file, args.opts, args.confidence_threshold, default=None)
    summary = run_demo(
        DemoRunner(cfg),
        inputs,
        args.output,
        json_path=args.json,
        force=args.force,
        progress=not args.no_progress,
    )
    print(
        f"{summary['images']} image(s)/frame(s), {summary['detections']} detection(s); "
        f"wrote {len(summary['outputs'])} file(s) under {args.output}"
        + (f" and {args.json}" if args.json else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="demo.py"))
