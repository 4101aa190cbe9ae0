#!/usr/bin/env python
r"""Publish trained weights: the model only (no optimizer, scheduler or iteration), in full or half
precision, in a file named with its sha256 prefix (MMDetection's publish_model convention).

Example:
    python tools/publish_model.py output/quick/faster_rcnn_R50_mdconv_FPN_instant/model_final.pth \
        published/faster_rcnn_R50_mdconv_FPN_instant.pth --half
    python train_net.py --config-file quick/faster_rcnn_R50_mdconv_FPN_instant.yaml --eval-only \
        MODEL.WEIGHTS published/faster_rcnn_R50_mdconv_FPN_instant-<sha8>.pth

The input is read tensors-only; --allow-unsafe unpickles anything. The output is written
atomically and never replaces a file unless --force. Logic: dcnv2.checkpoint.publish.
"""

import sys

from dcnv2.checkpoint.publish import publish_model
from dcnv2.tools.cli import add_force_argument, run_cli, tool_parser

PROG = "publish_model.py"


def parse_args(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("input", help="checkpoint written by train_net.py (.pth), or a .pkl")
    parser.add_argument("output", help="NAME.pth; NAME-<sha256[:8]>.pth is written")
    parser.add_argument("--half", action="store_true", help="float16 weights (half the size)")
    add_force_argument(parser, "an existing output file")
    parser.add_argument(
        "--allow-unsafe",
        action="store_true",
        help="unpickle arbitrary objects in INPUT (only for files from a trusted source)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    path, info = publish_model(
        args.input, args.output, half=args.half, force=args.force, allow_unsafe=args.allow_unsafe
    )
    dropped = f"; dropped {', '.join(info['dropped'])}" if info["dropped"] else ""
    print(
        f"wrote {path}: {info['tensors']} tensors, {info['parameters'] / 1e6:.1f} M parameters, "
        f"{info['bytes'] / 2**20:.1f} MiB (input {info['input_bytes'] / 2**20:.1f} MiB){dropped}"
    )
    print(f"sha256 {info['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog=PROG))
