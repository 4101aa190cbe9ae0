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
    # Defaults (None): those of the registered splits, dcnv2.data.synthetic.SPLITS.
    parser.add_argument("--num-train", type=int, help="training images (default: 96)")
    parser.add_argument("--num-val", type=int, help="validation images (default: 24)")
    parser.add_argument("--seed", type=int, help="train seed; val uses seed + 1 (default: 0)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.num_train = SPLITS["train"][0] if args.num_train is None else args.num_train
    args.num_val = SPLITS["val"][0] if args.num_val is None else args.num_val
    args.seed = SPLITS["train"][1] if args.seed is None else args.seed
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
