"""Speed of modulated deformable RoI pooling against detectron2's ``ROIAlignV2`` pooler on CPU
(``tools/benchmark_mdpool.py``): FPN maps p2-p5 of one image and random boxes, 7x7 bins, forward
and forward+backward in interleaved rounds; medians.
"""

import statistics
from typing import Dict, List, Sequence

import torch
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
from detectron2.structures import Boxes
from torch import nn

from ..errors import UserInputError
from ..layers.mdpool import deform_roi_align
from ..modeling.poolers import DeformableROIPooler
from .timing import InProcessSteps, forward_steps, interleaved_times, text_table

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
METHODS = ("ROIAlignV2", "mdpool op (torch)", "mdpool op (cpp)", "mdpool layer (cpp)")
STEPS = ("forward", "forward_backward")


def random_boxes(num: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """(num, 4) XYXY boxes inside the image, sizes log-uniform in [16, min(height, width)] px,
    aspect ratios log-uniform in [1/2, 2]."""
    g = torch.Generator().manual_seed(seed)
    low, high = torch.log(torch.tensor(16.0)), torch.log(torch.tensor(float(min(height, width))))
    size = torch.exp(low + (high - low) * torch.rand(num, generator=g))
    ratio = torch.exp((torch.rand(num, generator=g) * 2 - 1) * torch.log(torch.tensor(2.0)))
    w = (size / ratio.sqrt()).clamp(max=width)
    h = (size * ratio.sqrt()).clamp(max=height)
    x0 = torch.rand(num, generator=g) * (width - w)
    y0 = torch.rand(num, generator=g) * (height - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], 1)


class FixedOffsetLevel(nn.Module):
    """The mdpool op alone at one pyramid level: ``deform_roi_align`` with given offsets (one
    row per RoI of the level)."""

    def __init__(self, offset: torch.Tensor, scale: float, impl: str):
        super().__init__()
        self.offset, self.scale, self.impl = offset, scale, impl

    def forward(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return deform_roi_align(
            features, rois, self.offset, output_size=7, spatial_scale=self.scale, impl=self.impl
        )


def fixed_offset_pooler(offsets: List[torch.Tensor], impl: str) -> ROIPooler:
    """detectron2's ROIPooler (level assignment, output layout) with the mdpool op at every
    level."""
    pooler = ROIPooler(7, SCALES, 0, "ROIAlignV2")
    pooler.level_poolers = nn.ModuleList(
        FixedOffsetLevel(o, s, impl) for o, s in zip(offsets, SCALES)
    )
    return pooler


def benchmark_mdpool(
    rois: int = 1000,
    height: int = 800,
    width: int = 1216,
    channels: int = 256,
    fc_dim: int = 1024,
    repeats: int = 5,
    methods: Sequence[str] = METHODS,
) -> Dict:
    """Time the poolers of :data:`METHODS` on one input.

    Returns:
        dict: the settings and ``results``: per method, median ``forward_s`` and
        ``forward_backward_s`` and their ratios to ``ROIAlignV2``.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or min(rois, height, width, channels, fc_dim, repeats) < 1:
        raise UserInputError(
            f"need --rois, --height, --width, --channels, --fc-dim, --repeats >= 1 and methods "
            f"among {list(METHODS)}; got unknown {unknown}"
        )
    torch.manual_seed(0)
    layer = DeformableROIPooler(7, SCALES, 0, in_channels=channels, fc_dim=fc_dim)
    g = torch.Generator().manual_seed(1)
    maps = [
        torch.randn(1, channels, -(-height // int(1 / s)), -(-width // int(1 / s)), generator=g)
        for s in SCALES
    ]
    boxes = [Boxes(random_boxes(rois, height, width))]
    levels = assign_boxes_to_levels(boxes, 2, 5, 224, 4)
    per_level = [int((levels == i).sum()) for i in range(4)]
    offsets = [0.1 * torch.randn(n, 2, 7, 7, generator=g) for n in per_level]
    leaves = [t.requires_grad_() for t in maps + offsets]
    poolers = {
        "ROIAlignV2": ROIPooler(7, SCALES, 0, "ROIAlignV2"),
        "mdpool op (torch)": fixed_offset_pooler(offsets, "torch"),
        "mdpool op (cpp)": fixed_offset_pooler(offsets, "cpp"),
        "mdpool layer (cpp)": layer,
    }
    workers = {}
    for name in methods:
        pooler = poolers[name]
        steps = forward_steps(lambda p=pooler: p(maps, boxes), leaves + list(pooler.parameters()))
        workers[name] = InProcessSteps(dict(zip(STEPS, steps)))
    # Interleaved so that a change in the machine's load affects all methods alike.
    times = interleaved_times(workers, STEPS, repeats)
    results = {n: {f"{s}_s": statistics.median(times[n][s]) for s in STEPS} for n in methods}
    base = results.get("ROIAlignV2")
    for r in results.values() if base else ():
        r.update({f"{s}_ratio": r[f"{s}_s"] / base[f"{s}_s"] for s in STEPS})
    return {
        "rois": rois,
        "height": height,
        "width": width,
        "channels": channels,
        "fc_dim": fc_dim,
        "rois_per_level": per_level,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "results": results,
    }


def format_table(result: Dict, markdown: bool = False) -> str:
    """Forward and forward+backward milliseconds of each method, and ratios to ROIAlignV2."""
    rows = []
    for name, r in result["results"].items():
        rows.append([name])
        for step in STEPS:
            ratio = r.get(f"{step}_ratio")
            rows[-1] += [f"{1000 * r[f'{step}_s']:.1f}", "-" if ratio is None else f"{ratio:.2f}x"]
    header = ["method", "fwd ms", "fwd ratio", "fwd+bwd ms", "fwd+bwd ratio"]
    return text_table(header, rows, markdown=markdown)
