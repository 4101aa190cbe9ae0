"""Compiled CPU column kernels of the native backend (``csrc/*.cpp``), built on first use.

Same functions and layouts as :mod:`.native_torch` (CPU), plus a packed AVX2 :func:`gemm`.
"""

import functools
import logging
import os
from typing import Optional

import torch

from .extension import JitExtension

logger = logging.getLogger(__name__)

_EXTENSION = JitExtension(
    name="dcnv2_native_cpu",
    sources=[
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", name)
        for name in ("deform_conv_cpu.cpp", "deform_conv_packed.cpp", "gemm_cpu.cpp")
    ],
    probe="dcnv2_native.im2col",
    what="native deformable-conv kernels",
    fallback="PyTorch-op kernels",
    logger=logger,
)


def is_available(warn: bool = True) -> bool:
    """Whether the compiled kernels load (building them on the first call)."""
    return _EXTENSION.is_available(warn)


def error() -> Optional[str]:
    """Why the build failed, or None."""
    return _EXTENSION.error()


def im2col(xp, offset, mask, kernel, stride, padding, dilation, dg, groups, p_begin, p_end):
    return torch.ops.dcnv2_native.im2col(
        xp, offset, mask, kernel, stride, padding, dilation, dg, groups, p_begin, p_end
    )


def backward(xp, offset, mask, grad_cols, *args):
    """As :func:`.native_torch.backward`: (offset gradient, mask gradient, columns); the
    results not asked for are unspecified."""
    return torch.ops.dcnv2_native.backward(xp, offset, mask, grad_cols.contiguous(), *args)


def crop_channels_first(xp: torch.Tensor) -> torch.Tensor:
    """(n, H+2, W+2, C) -> (n, C, H, W) without the one-pixel padding."""
    return torch.ops.dcnv2_native.crop_channels_first(xp)


@functools.lru_cache(maxsize=None)
def gemm_supported() -> bool:
    """Whether :func:`gemm` can run here: the extension loads and the CPU has AVX2 and FMA."""
    return is_available(warn=False) and bool(torch.ops.dcnv2_native.gemm_supported())


def gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, accumulate: bool = False) -> None:
    """``c = a @ b`` (``c += a @ b`` when ``accumulate``) for float32 (M, K) @ (K, N)."""
    torch.ops.dcnv2_native.gemm(a, b, c, accumulate)


def forward_packed(xp, offset, mask, wpacked, kernel, stride, padding, dilation, dg, out) -> None:
    """One convolution group's float32 forward into ``out`` (n, C_out, Ho*Wo).

    Args:
        wpacked (Tensor): (ceil(C_out/16), kh*kw*C, 16), from :func:`pack_rows16`.
    """
    torch.ops.dcnv2_native.forward_packed(
        xp, offset, mask, wpacked, None, kernel, stride, padding, dilation, dg, out
    )


def pack_rows16(w: torch.Tensor) -> torch.Tensor:
    """(M, D) float32 -> (ceil(M/16), D, 16): rows in zero-padded panels of 16."""
    return torch.ops.dcnv2_native.pack_rows16(w)


def backward_packed(
    xp, offset, mask, grad_out, weight, kernel, stride, padding, dilation, dg,
    grad_xp, grad_offset, grad_mask, grad_w,
) -> None:  # fmt: skip
    """One convolution group's float32 backward, no columns stored; any output may be None.

    Args:
        grad_w: zeroed (C_out, kh*kw*C), columns ordered (tap, channel).
        weight (Tensor): (C_out, C, kh, kw).
        grad_out (Tensor): (n, C_out, Ho*Wo).
    """
    torch.ops.dcnv2_native.backward_packed(
        xp, offset, mask, grad_out, weight, kernel, stride, padding, dilation, dg,
        grad_xp, grad_offset, grad_mask, grad_w,
    )  # fmt: skip
