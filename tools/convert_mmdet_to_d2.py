#!/usr/bin/env python
r"""Convert an MMDetection (v2/v3) Faster or Mask R-CNN checkpoint with a ResNet/ResNeXt + FPN
backbone, with or without DCN, into a detectron2 checkpoint for dcnv2, and print the config
overrides the converted model needs.

Example:
    python tools/convert_mmdet_to_d2.py \
        faster_rcnn_r50_fpn_mdconv_c3-c5_1x_coco_20200130-d099253b.pth mmdet_mdconv_r50.pth
    python train_net.py --config-file configs/mmdet/faster_rcnn_R50_mdconv_FPN_1x_mmdet.yaml \
        --eval-only MODEL.WEIGHTS mmdet_mdconv_r50.pth

The input is read tensors-only; a checkpoint that needs other pickled objects (an mmengine
training checkpoint keeps its message hub) is refused unless --allow-unsafe is given.
Logic: dcnv2.checkpoint.convert_mmdet.
"""

import sys

from dcnv2.checkpoint.convert_mmdet import conversion_report, convert_mmdet_checkpoint
from dcnv2.errors import DCNv2Error, UserInputError, report_user_error
from dcnv2.tools.cli import add_force_argument, run_cli, tool_parser

PROG = "convert_mmdet_to_d2.py"


def parse_args(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("input", help="MMDetection checkpoint (.pth)")
    parser.add_argument("output", help="detectron2 checkpoint to write (.pth)")
    add_force_argument(parser, "OUTPUT if it exists")
    parser.add_argument(
        "--allow-unsafe",
        action="store_true",
        help="unpickle arbitrary objects in INPUT (only for files from a trusted source)",
    )
    parser.add_argument(
        "--deform-modulated",
        choices=["true", "false"],
        help="DCNv2 (true) or DCN (false), when the offset-conv channels fit both",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    modulated = None if args.deform_modulated is None else args.deform_modulated == "true"
    try:
        spec = convert_mmdet_checkpoint(
            args.input,
            args.output,
            allow_unsafe=args.allow_unsafe,
            overwrite=args.force,
            deform_modulated=modulated,
        )
    except DCNv2Error as e:  # the input's or the output's problem (a full disk included)
        return report_user_error(PROG, e)
    except OSError as e:
        raise UserInputError(f"cannot read {args.input!r}: {e}") from None
    print(conversion_report(spec, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog=PROG))
