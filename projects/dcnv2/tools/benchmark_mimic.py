"""Training-time cost of R-CNN feature mimicking (``tools/benchmark_mimic.py``): one config with
mimicking on and off, training iterations in interleaved rounds; medians and cost per crop.
"""

import statistics
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from detectron2.modeling import build_model

from ..config import get_cfg
from ..errors import UserInputError
from .timing import InProcessSteps, detection_batch, interleaved_times, text_table, training_step

# Overrides that turn a mimic config into the plain detector it extends.
PLAIN = [
    "MODEL.META_ARCHITECTURE", "GeneralizedRCNN",
    "MODEL.ROI_HEADS.NAME", "DCNv2StandardROIHeads",
    "MODEL.DCNV2.MIMIC.ENABLED", "False",
]  # fmt: skip


def counted_step(cfg, batch) -> Tuple[Callable[[], None], List[int]]:
    """One training iteration of ``cfg``'s model on ``batch``, and the list of the batch sizes of
    every backbone call of the last iteration (the batch, then the crops)."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    calls: List[int] = []
    # The crops may run an FPN's bottom-up network without its forward (see fpn_outputs).
    counted = getattr(model.backbone, "bottom_up", model.backbone)
    counted.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    train_step = training_step(model, batch, lr=1e-4, momentum=0.0)

    def step():
        calls.clear()  # so that it holds this iteration's backbone calls
        train_step()

    return step, calls


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
        dict: the settings, ``results`` (``{"off"|"on": {"seconds_per_iter", "crops_per_iter"}}``),
        ``overhead`` (on / off - 1) and ``seconds_per_crop``.
    """
    if min(height, width) < 64 or iters < 1 or batch < 1:
        raise UserInputError("need --height/--width >= 64, --iters >= 1 and --batch >= 1")
    base = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + list(opts)
    cfg_on = get_cfg(config_file, base)
    if not cfg_on.MODEL.DCNV2.MIMIC.ENABLED:
        raise UserInputError(f"{config_file} does not enable MODEL.DCNV2.MIMIC")
    cfg_off = get_cfg(config_file, base + PLAIN)
    classes = cfg_on.MODEL.ROI_HEADS.NUM_CLASSES
    images = detection_batch(batch, height, width, boxes_per_image=boxes, num_classes=classes)
    steps = {name: counted_step(cfg, images) for name, cfg in (("off", cfg_off), ("on", cfg_on))}
    workers = {name: InProcessSteps({"iteration": step}) for name, (step, _) in steps.items()}
    times = interleaved_times(workers, ("iteration",), iters)
    rows = {
        name: {
            "seconds_per_iter": statistics.median(times[name]["iteration"]),
            "crops_per_iter": sum(calls[1:]),
        }
        for name, (_, calls) in steps.items()
    }
    extra = rows["on"]["seconds_per_iter"] - rows["off"]["seconds_per_iter"]
    crops = rows["on"]["crops_per_iter"]
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
        "seconds_per_crop": extra / crops if crops else None,
    }


def format_table(result: Dict) -> str:
    """Seconds and crops per iteration, mimicking off and on, then the overhead (console)."""
    rows = [
        [name, f"{r['seconds_per_iter']:.3f}", r["crops_per_iter"]]
        for name, r in result["results"].items()
    ]
    table = text_table(["mimic", "s/iter", "crops/iter"], rows, markdown=False)
    per_crop = result.get("seconds_per_crop")
    per_crop = "" if per_crop is None else f" ({per_crop:+.3f} s per crop)"
    return f"{table}\noverhead: {100 * result['overhead']:+.0f}%{per_crop}"
