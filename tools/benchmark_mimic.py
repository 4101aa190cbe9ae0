#!/usr/bin/env python
"""Training-time cost of R-CNN feature mimicking: seconds per iteration with and without it.

Both variants are the same config and the same random weights; "off" is the plain detector
(GeneralizedRCNN + DCNv2StandardROIHeads, MODEL.DCNV2.MIMIC.ENABLED False). One iteration is
forward, backward and an SGD step on a fixed synthetic batch (random images, random boxes). Also
reported: how many crops the R-CNN branch ran through the backbone per iteration.

Examples:
    python tools/benchmark_mimic.py --height 320 --width 480 --iters 5 --json mimic.json
    python tools/benchmark_mimic.py --opts MODEL.DCNV2.MIMIC.CROP_SIZE 128
"""

import argparse
import json
import statistics
import sys
import time
import warnings

# Importing detectron2 emits torch deprecation warnings meant for its developers, not for users.
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import dcnv2  # noqa: E402
from dcnv2.utils.cli import UserInputError, run_cli, tool_parser  # noqa: E402

DEFAULT_CONFIG = "faster_rcnn_R50_mdconv_mdpool_mimic_FPN_1x.yaml"
PLAIN = [
    "MODEL.META_ARCHITECTURE", "GeneralizedRCNN",
    "MODEL.ROI_HEADS.NAME", "DCNv2StandardROIHeads",
    "MODEL.DCNV2.MIMIC.ENABLED", "False",
]  # fmt: skip


def parse_args(argv=None):
    parser = tool_parser(__doc__, skip=2)
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, help="a mimic config")
    parser.add_argument("--height", type=int, default=320, help="image height (default 320)")
    parser.add_argument("--width", type=int, default=480, help="image width (default 480)")
    parser.add_argument("--batch", type=int, default=2, help="images per batch (default 2)")
    parser.add_argument("--boxes", type=int, default=8, help="GT boxes per image (default 8)")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations (default 5)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ..."
    )
    return parser.parse_args(argv)


def synthetic_batch(n, h, w, k, seed=0):
    """``n`` random images with ``k`` random GT boxes (at least 16 px a side) each."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(n):
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w - 16.0, h - 16.0])
        wh = 16 + torch.rand(k, 2, generator=g) * (torch.tensor([w, h]) - 16 - xy) * 0.9
        inst = Instances((h, w), gt_boxes=Boxes(torch.cat([xy, xy + wh], 1)))
        inst.gt_classes = torch.randint(0, 80, (k,), generator=g)
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        batch.append({"image": image, "instances": inst})
    return batch


def time_training(cfg, batch, iters):
    """Median seconds per training iteration, and backbone images per iteration beyond the batch."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    calls = []
    model.backbone.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    times = []
    with EventStorage():
        for i in range(iters + 1):  # the first one warms up
            calls.clear()
            start = time.perf_counter()
            losses = model(batch)
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times), sum(calls[1:])


def main(argv=None) -> int:
    args = parse_args(argv)
    if min(args.height, args.width) < 64 or args.iters < 1 or args.batch < 1:
        raise UserInputError("need --height/--width >= 64, --iters >= 1 and --batch >= 1")
    base = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + list(args.opts)
    cfg_on = dcnv2.get_cfg(args.config_file, base)
    if not cfg_on.MODEL.DCNV2.MIMIC.ENABLED:
        raise UserInputError(f"{args.config_file} does not enable MODEL.DCNV2.MIMIC")
    cfg_off = dcnv2.get_cfg(args.config_file, base + PLAIN)
    batch = synthetic_batch(args.batch, args.height, args.width, args.boxes)
    rows = {}
    for name, cfg in (("off", cfg_off), ("on", cfg_on)):
        sec, crops = time_training(cfg, batch, args.iters)
        rows[name] = {"seconds_per_iter": sec, "crops_per_iter": crops}
    overhead = rows["on"]["seconds_per_iter"] / rows["off"]["seconds_per_iter"] - 1
    result = {
        "config": args.config_file,
        "opts": list(args.opts),
        "batch": args.batch,
        "height": args.height,
        "width": args.width,
        "gt_boxes_per_image": args.boxes,
        "crop_size": cfg_on.MODEL.DCNV2.MIMIC.CROP_SIZE,
        "num_positives_per_image": cfg_on.MODEL.DCNV2.MIMIC.NUM_POSITIVES_PER_IMAGE,
        "backend": cfg_on.MODEL.DCNV2.BACKEND,
        "threads": torch.get_num_threads(),
        "iters": args.iters,
        "results": rows,
        "overhead": overhead,
    }
    print(f"{'mimic':<6} {'s/iter':>8} {'crops/iter':>11}")
    for name, r in rows.items():
        print(f"{name:<6} {r['seconds_per_iter']:>8.3f} {r['crops_per_iter']:>11d}")
    print(f"overhead: {100 * overhead:+.0f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="benchmark_mimic.py"))
