#!/usr/bin/env python
"""Generate the synthetic COCO-format shapes dataset (dcnv2.data.synthetic) ahead of time.

    python tools/generate_synthetic_dataset.py                # what train_net.py would generate
    python tools/generate_synthetic_dataset.py --root /data --num-train 500 --seed 3

The defaults give exactly the folders of the registered ``dcnv2_synthetic_train`` /
``dcnv2_synthetic_val``; a split that is already there is not written again. Other sizes or
seeds go to their own folders: register them with
``dcnv2.data.synthetic.register_synthetic_dataset``.
"""

import os
import sys

from dcnv2.data.synthetic import SPLITS, prepare_synthetic_split
from dcnv2.errors import UserInputError
from dcnv2.tools.cli import run_cli, tool_parser


def parse_args(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument(
        "--root",
        default=os.getenv("DETECTRON2_DATASETS", "datasets"),
        help="datasets folder (default: $DETECTRON2_DATASETS, else datasets/)",
    )
    (num_train, seed), (num_val, _) = SPLITS["train"], SPLITS["val"]  # the registered splits
    for flag, default, what in (
        ("--num-train", num_train, "training images"),
        ("--num-val", num_val, "validation images"),
        ("--seed", seed, "train seed; val uses seed + 1"),
    ):
        parser.add_argument(flag, type=int, default=default, help=f"{what} (default: {default})")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.num_train < 1 or args.num_val < 1:
        raise UserInputError(
            f"--num-train and --num-val must be >= 1, got {args.num_train}, {args.num_val}"
        )
    root = os.path.expanduser(args.root)
    for split, num, seed in (
        ("train", args.num_train, args.seed),
        ("val", args.num_val, args.seed + 1),
    ):
        print(f"{split}: {prepare_synthetic_split(root, split, num, seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="generate_synthetic_dataset.py"))
