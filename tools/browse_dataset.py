#!/usr/bin/env python
r"""Draw a dataset's images with their annotations as the model is trained on them: after the
config's training augmentations (resize, flip), with class names from the dataset metadata.

Examples:
    python tools/browse_dataset.py --output browse/ --num 8
    python tools/browse_dataset.py --config-file faster_rcnn_R50_mdconv_FPN_1x.yaml \
        --output browse/ --num 4 --show-original --opts DATASETS.TRAIN "('my_train',)" \
        DATASETS.DCNV2.COCO "(('my_train','train.json','images/'),)"

The images are DATASETS.TRAIN's (or --dataset's), loaded and filtered as training does, first
ones first; --show-original draws the stored image with its annotations on the left. Existing
pictures are never overwritten unless --force. Logic: dcnv2.tools.browse_dataset.
"""

import sys

from dcnv2.tools.browse_dataset import browse_dataset
from dcnv2.tools.cli import (
    add_config_arguments,
    choose_config_file,
    run_cli,
    setup_cfg,
    tool_parser,
)

# Its training data is generated on first use: browsing works offline.
DEFAULT = "quick/faster_rcnn_R50_mdconv_FPN_instant.yaml"


def parse_args(argv=None):
    parser = add_config_arguments(tool_parser(__doc__), default=DEFAULT, force="existing pictures")
    parser.add_argument("--output", required=True, help="folder for the pictures")
    parser.add_argument("--num", type=int, default=10, help="images to draw (default 10)")
    parser.add_argument("--dataset", help="a registered dataset instead of DATASETS.TRAIN")
    parser.add_argument(
        "--show-original",
        action="store_true",
        help="also draw the stored image with its annotations, on the left",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the augmentations")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    opts = ["MODEL.WEIGHTS", "", *args.opts]
    cfg = setup_cfg(choose_config_file(args.config_file, opts, DEFAULT), opts)
    summary = browse_dataset(
        cfg,
        args.output,
        num=args.num,
        dataset=args.dataset,
        show_original=args.show_original,
        force=args.force,
        seed=args.seed,
    )
    images = summary["images"]
    boxes = sum(len(i["instances"]) for i in images)
    print(f"{len(images)} picture(s), {boxes} annotation(s) after augmentation -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="browse_dataset.py"))
