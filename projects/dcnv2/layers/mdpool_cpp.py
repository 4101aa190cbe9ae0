"""Compiled CPU kernels of modulated deformable RoI pooling (``csrc/mdpool_cpu.cpp``).

Built on first use; without them :func:`.mdpool.deform_roi_align` uses PyTorch ops.
"""

import logging
import os
from typing import Optional, Tuple

import torch

from .extension import JitExtension

__all__ = ["is_available", "error", "forward", "backward"]

logger = logging.getLogger(__name__)

_EXTENSION = JitExtension(
    name="dcnv2_mdpool_cpu",
    sources=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "mdpool_cpu.cpp")],
    probe="dcnv2_mdpool.forward",
    what="mdpool kernels",
    fallback="PyTorch-op implementation",
    logger=logger,
)


def is_available(warn: bool = True) -> bool:
    """Whether the compiled kernels load (building them on the first call)."""
    return _EXTENSION.is_available(warn)


def error() -> Optional[str]:
    """Why the build failed, or None."""
    return _EXTENSION.error()


def forward(features, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, aligned):
    """(R, C, Ph, Pw) pooled features; arguments as ``deform_roi_align``'s, validated."""
    return torch.ops.dcnv2_mdpool.forward(
        features, rois, offset, *output_size, spatial_scale, sampling_ratio, gamma, aligned
    )


def backward(
    grad_out, features, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, aligned,
    need_features, need_offset,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:  # fmt: skip
    """Gradients for the features and the offsets, None where not asked for."""
    grad_features, grad_offset = torch.ops.dcnv2_mdpool.backward(
        grad_out.contiguous(), features, rois, offset, *output_size, spatial_scale,
        sampling_ratio, gamma, aligned, need_features, need_offset,
    )  # fmt: skip
    return (
        grad_features if need_features else None,
        grad_offset if need_offset and offset is not None else None,
    )
