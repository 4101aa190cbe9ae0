"""Training-time cost of R-CNN feature mimicking: seconds per iteration with and without it, the
logic of ``tools/benchmark_mimic.py``.

Both variants are the same config and the same random weights; "off" is the plain detector
(GeneralizedRCNN + DCNv2StandardROIHeads, ``MODEL.DCNV2.MIMIC.ENABLED False``). One iteration
is forward, backward and an SGD step on a fixed synthetic batch (:func:`.common.
detection_batch`); the median of ``iters`` iterations after one warm-up. Also reported: how
many crops the R-CNN branch ran through the backbone per iteration.
"""

import statistics
from typing import Dict, Sequence, Tuple

import torch

from ..utils.cli import UserInputError
from .common import detection_batch, sgd_step, text_table, time_runs

__all__ = ["PLAIN", "benchmark_mimic", "format_table", "time_training"]

# Overrides that turn a mimic config into the plain detector it extends.
PLAIN = [
    "MODEL.META_ARCHITECTURE", "GeneralizedRCNN",
    "MODEL.ROI_HEADS.NAME", "DCNv2StandardROIHeads",
    "MODEL.DCNV2.MIMIC.ENABLED", "False",
]  # fmt: skip


def time_training(cfg, batch, iters: int) -> Tuple[float, int]:
    """Median seconds per training iteration of ``cfg``'s model (seeded random weights, SGD at
    lr 1e-4), and the images the backbone ran per iteration beyond the batch itself."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    model = build_model(cfg).train()
    calls = []
    # The crops may run an FPN's bottom-up network without its forward (see fpn_outputs).
    counted = getattr(model.backbone, "bottom_up", model.backbone)
    counted.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    train_step = sgd_step(model, batch, lr=1e-4)

    def step():
        calls.clear()  # so that it holds the last iteration's backbone calls
        train_step()

    with EventStorage():
        times = time_runs(step, warmup=1, repeats=iters)
    return statistics.median(times), sum(calls[1:])


def benchmark_mimic(
    config_file: str,
    opts: Sequence[str] = (),
    height: int = 320,
    width: int = 480,
    batch: int = 2,
    boxes: int = 8,
    iters: int = 5,
) -> Dict:
    """Time training iterations of ``config_file`` (a mimic config) with mimicking off, then on.

    Returns:
        dict: the settings, ``results`` (``{"off"|"on": {"seconds_per_iter",
        "crops_per_iter"}}``) and ``overhead`` (on / off - 1), as ``--json`` writes it.

    Raises:
        UserInputError: bad sizes or counts, or a config that does not enable mimicking.
    """
    from ..config import get_cfg

    if min(height, width) < 64 or iters < 1 or batch < 1:
        raise UserInputError("need --height/--width >= 64, --iters >= 1 and --batch >= 1")
    base = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + list(opts)
    cfg_on = get_cfg(config_file, base)
    if not cfg_on.MODEL.DCNV2.MIMIC.ENABLED:
        raise UserInputError(f"{config_file} does not enable MODEL.DCNV2.MIMIC")
    cfg_off = get_cfg(config_file, base + PLAIN)
    images = detection_batch(
        batch,
        height,
        width,
        boxes_per_image=boxes,
        num_classes=cfg_on.MODEL.ROI_HEADS.NUM_CLASSES,
    )
    rows = {}
    for name, cfg in (("off", cfg_off), ("on", cfg_on)):
        sec, crops = time_training(cfg, images, iters)
        rows[name] = {"seconds_per_iter": sec, "crops_per_iter": crops}
    return {
        "config": config_file,
        "opts": list(opts),
        "batch": batch,
        "height": height,
        "width": width,
        "gt_boxes_per_image": boxes,
        "crop_size": cfg_on.MODEL.DCNV2.MIMIC.CROP_SIZE,
        "num_positives_per_image": cfg_on.MODEL.DCNV2.MIMIC.NUM_POSITIVES_PER_IMAGE,
        "backend": cfg_on.MODEL.DCNV2.BACKEND,
        "threads": torch.get_num_threads(),
        "iters": iters,
        "results": rows,
        "overhead": rows["on"]["seconds_per_iter"] / rows["off"]["seconds_per_iter"] - 1,
    }


def format_table(result: Dict) -> str:
    """Seconds and crops per iteration, mimicking off and on, then the overhead (console)."""
    rows = [
        [name, f"{r['seconds_per_iter']:.3f}", r["crops_per_iter"]]
        for name, r in result["results"].items()
    ]
    table = text_table(["mimic", "s/iter", "crops/iter"], rows, markdown=False)
    return f"{table}\noverhead: {100 * result['overhead']:+.0f}%"
