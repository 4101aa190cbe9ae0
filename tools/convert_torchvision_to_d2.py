#!/usr/bin/env python
r"""Convert torchvision ImageNet ResNet/ResNeXt weights into a detectron2 initialisation (.pkl),
the one MMDetection trains from, and print the config overrides it needs.

Example:
    python tools/convert_torchvision_to_d2.py resnet50-0676ba61.pth R-50-torchvision.pkl
    python train_net.py --config-file configs/faster_rcnn_R50_mdconv_FPN_1x.yaml \
        MODEL.WEIGHTS R-50-torchvision.pkl MODEL.RESNETS.STRIDE_IN_1X1 False INPUT.FORMAT RGB \
        MODEL.PIXEL_MEAN "[123.675, 116.28, 103.53]" MODEL.PIXEL_STD "[58.395, 57.12, 57.375]"

The input is read tensors-only (torchvision's files are plain state dicts); --allow-unsafe
unpickles anything. Logic: dcnv2.checkpoint.convert_torchvision.
"""

import sys

from dcnv2.checkpoint.convert_torchvision import (
    conversion_report,
    convert_torchvision_checkpoint,
)
from dcnv2.errors import DCNv2Error, UserInputError, report_user_error
from dcnv2.tools.cli import add_force_argument, run_cli, tool_parser

PROG = "convert_torchvision_to_d2.py"


def parse_args(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("input", help="torchvision ResNet state dict (.pth)")
    parser.add_argument("output", help="detectron2 weights to write (.pkl)")
    add_force_argument(parser, "OUTPUT if it exists")
    parser.add_argument(
        "--allow-unsafe",
        action="store_true",
        help="unpickle arbitrary objects in INPUT (only for files from a trusted source)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        spec, dropped = convert_torchvision_checkpoint(
            args.input, args.output, allow_unsafe=args.allow_unsafe, overwrite=args.force
        )
    except DCNv2Error as e:  # the input's or the output's problem (a full disk included)
        return report_user_error(PROG, e)
    except OSError as e:
        raise UserInputError(f"cannot read {args.input!r}: {e}") from None
    print(conversion_report(spec, dropped, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog=PROG))
