"""Speed of modulated deformable RoI pooling against detectron2's ``ROIAlignV2`` pooler on CPU
(``tools/benchmark_mdpool.py``): FPN maps p2-p5 of one image and random boxes, 7x7 bins, forward
and forward+backward in interleaved rounds; medians.
"""

import statistics
from typing import Dict, List, Sequence

import torch

from ..errors import UserInputError
from .timing import InProcessSteps, interleaved_times, text_table

__all__ = ["METHODS", "SCALES", "random_boxes", "benchmark_mdpool", "format_table"]

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
METHODS = ("ROIAlignV2", "mdpool op (torch)", "mdpool op (cpp)", "mdpool layer (cpp)")


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


def _poolers(channels: int, fc_dim: int):
    from detectron2.modeling.poolers import ROIPooler
    from torch import nn

    from ..layers.mdpool import deform_roi_align
    from ..modeling.poolers import DeformableROIPooler

    class FixedOffsetAlign(nn.Module):
        """``deform_roi_align`` of one level with given offsets (one row per RoI of the level)."""

        def __init__(self, offset: torch.Tensor, scale: float, impl: str):
            super().__init__()
            self.offset, self.scale, self.impl = offset, scale, impl

        def forward(self, x, rois):
            return deform_roi_align(
                x, rois, self.offset, output_size=7, spatial_scale=self.scale, impl=self.impl
            )

    class FixedOffsetPooler(ROIPooler):
        """detectron2's pooler with ``deform_roi_align`` and given offsets at every level."""

        def __init__(self, offsets: List[torch.Tensor], impl: str):
            super().__init__(7, SCALES, 0, "ROIAlignV2")
            self.level_poolers = nn.ModuleList(
                FixedOffsetAlign(o, s, impl) for o, s in zip(offsets, SCALES)
            )

    layer = DeformableROIPooler(7, SCALES, 0, in_channels=channels, fc_dim=fc_dim)
    return FixedOffsetPooler, layer


def _steps(pooler, maps, boxes, offsets):
    """Forward (no grad) and forward+backward of one pooler, as functions without arguments."""
    inputs = [m.clone().requires_grad_() for m in maps]

    def forward():
        with torch.no_grad():
            pooler(inputs, boxes)

    def forward_backward():
        for t in offsets:
            t.requires_grad_()
        pooler(inputs, boxes).sum().backward()
        for t in [*inputs, *offsets, *pooler.parameters()]:
            t.grad = None
        for t in offsets:
            t.requires_grad_(False)

    return forward, forward_backward


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
    from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
    from detectron2.structures import Boxes

    unknown = [m for m in methods if m not in METHODS]
    if unknown or min(rois, height, width, channels, fc_dim, repeats) < 1:
        raise UserInputError(
            f"need --rois, --height, --width, --channels, --fc-dim, --repeats >= 1 and methods "
            f"among {list(METHODS)}; got unknown {unknown}"
        )
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    maps = [
        torch.randn(1, channels, -(-height // int(1 / s)), -(-width // int(1 / s)), generator=g)
        for s in SCALES
    ]
    boxes = [Boxes(random_boxes(rois, height, width))]
    levels = assign_boxes_to_levels(boxes, 2, 5, 224, 4)
    offsets = [
        (0.1 * torch.randn(int((levels == i).sum()), 2, 7, 7, generator=g)) for i in range(4)
    ]
    fixed_offset_pooler, layer = _poolers(channels, fc_dim)
    poolers = {
        "ROIAlignV2": ROIPooler(7, SCALES, 0, "ROIAlignV2"),
        "mdpool op (torch)": fixed_offset_pooler(offsets, "torch"),
        "mdpool op (cpp)": fixed_offset_pooler(offsets, "cpp"),
        "mdpool layer (cpp)": layer,
    }
    steps = ("forward", "forward_backward")
    workers = {
        name: InProcessSteps(
            dict(zip(steps, _steps(poolers[name], maps, boxes, offsets if "op" in name else [])))
        )
        for name in methods
    }
    # Interleaved so that a change in the machine's load affects all methods alike.
    times = interleaved_times(workers, steps, repeats)
    results = {
        name: {f"{step}_s": statistics.median(times[name][step]) for step in steps}
        for name in methods
    }
    if "ROIAlignV2" in results:
        base = results["ROIAlignV2"]
        for r in results.values():
            r["forward_ratio"] = r["forward_s"] / base["forward_s"]
            r["forward_backward_ratio"] = r["forward_backward_s"] / base["forward_backward_s"]
    return {
        "rois": rois,
        "height": height,
        "width": width,
        "channels": channels,
        "fc_dim": fc_dim,
        "rois_per_level": [int((levels == i).sum()) for i in range(4)],
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "results": results,
    }


def format_table(result: Dict, markdown: bool = False) -> str:
    """Forward and forward+backward milliseconds of each method, and ratios to ROIAlignV2."""

    def ratio(r, key):
        return f"{r[key]:.2f}x" if key in r else "-"

    rows = [
        [
            name,
            f"{1000 * r['forward_s']:.1f}",
            ratio(r, "forward_ratio"),
            f"{1000 * r['forward_backward_s']:.1f}",
            ratio(r, "forward_backward_ratio"),
        ]
        for name, r in result["results"].items()
    ]
    header = ["method", "fwd ms", "fwd ratio", "fwd+bwd ms", "fwd+bwd ratio"]
    return text_table(header, rows, markdown=markdown)
