#!/usr/bin/env python
r"""Draw where the stacked deformable layers sample for chosen image positions (DCNv2 paper,
arXiv 1811.11168, Fig. 1 and 3).

Each query position is traced back through the last --layers deformable convs (res5's three by
default: 9**3 = 729 points per query); every point is coloured by the product of the
modulations on its path, and a second panel shows the effective sampling locations (size and
opacity proportional to that weight).

Examples:
    python tools/visualize_sampling.py --input photo.jpg --output sampling.png \
        --points 320,240 100,80 \
        --opts MODEL.WEIGHTS output/quick/faster_rcnn_R50_mdconv_FPN_instant/model_final.pth
    # centres of the 2 best detections instead of --points:
    python tools/visualize_sampling.py --input photo.jpg --output sampling.png --max-boxes 2 \
        --opts MODEL.WEIGHTS output/quick/faster_rcnn_R50_mdconv_FPN_instant/model_final.pth

Without --config-file the tool reads the config.yaml the training run wrote beside its weights
(without weights: faster_rcnn_R50_mdconv_FPN_1x.yaml).
"""

import argparse
import os
import sys

from dcnv2.tools.cli import (
    UserInputError,
    add_config_arguments,
    choose_config_file,
    refuse_existing_outputs,
    run_cli,
    setup_cfg,
    tool_parser,
)
from dcnv2.tools.demo import DemoRunner, read_image
from dcnv2.tools.visualize_sampling import plot_sampling_locations, sample_image


def _point(text: str):
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a point as x,y in pixels, got {text!r}"
        ) from None
    return x, y


def parse_args(argv=None):
    parser = add_config_arguments(tool_parser(__doc__), force="--output if it exists")
    parser.add_argument("--input", required=True, help="an image file")
    parser.add_argument("--output", required=True, help="the PNG to write")
    parser.add_argument(
        "--points",
        nargs="+",
        type=_point,
        metavar="X,Y",
        help="query positions in pixels of the input image (default: detected box centres)",
    )
    parser.add_argument(
        "--max-boxes", type=int, default=3, help="detections to use without --points (default 3)"
    )
    parser.add_argument(
        "--layers", type=int, default=3, help="last deformable layers to trace (default 3)"
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="minimum score of a detection used without --points (default 0.5)",
    )
    parser.add_argument(
        "--random-offsets",
        type=float,
        default=0.0,
        metavar="RMS",
        help="for illustration without trained weights: random offset/mask predictors giving "
        "offsets of about RMS feature-map cells (an untrained model samples a regular grid)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-offsets")
    parser.add_argument("--dpi", type=int, default=100, help="resolution of the PNG (default 100)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    refuse_existing_outputs([args.output], args.force)
    if args.layers > 5:
        raise UserInputError(
            f"--layers {args.layers} would trace 9**{args.layers} points; use <= 5"
        )
    image = read_image(args.input)
    config_file = choose_config_file(args.config_file, args.opts)
    cfg = setup_cfg(config_file, args.opts, args.confidence_threshold)
    model = DemoRunner(cfg).predictor.model
    result = sample_image(
        model,
        cfg,
        image,
        args.points,
        args.max_boxes,
        args.layers,
        random_offsets=args.random_offsets,
        seed=args.seed,
    )
    title = f"{os.path.basename(config_file)}: {', '.join(result['layers'])}"
    if args.random_offsets > 0:
        title += f"\n(untrained model, random offsets of RMS {args.random_offsets} cells)"
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    plot_sampling_locations(
        result["input_image_rgb"],  # the input at its own size, positions in its pixels
        result["input_points"],
        result["input_locations"],
        result["weights"],
        args.output,
        title=title,
        dpi=args.dpi,
    )
    print(
        f"{len(result['points'])} query point(s) x {result['locations'].shape[1]} sampling "
        f"locations through {len(result['layers'])} layer(s) -> {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="visualize_sampling.py"))
