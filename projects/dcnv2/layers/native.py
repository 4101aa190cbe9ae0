"""The "native" deformable-convolution backend: detectron2's exact semantics on any device.

The op is im2col (bilinear sampling into columns) followed by one batched matmul, as in
detectron2's kernels. Two implementations of the column kernels share that driver:

- ``"cpp"`` (:mod:`dcnv2.layers.native_cpp`): a small C++ extension, JIT-compiled on first use
  and cached, parallel with ``at::parallel_for``; CPU float32/float64 only.
- ``"torch"`` (:mod:`dcnv2.layers.native_torch`): PyTorch ops; CUDA, other dtypes, and the
  fallback when the extension cannot be built.

Memory: forward saves only its inputs and backward recomputes the columns (in the same pass
as the input, offset and mask gradients); columns are built for
chunks of images, or of output positions, of at most ``_CHUNK_ELEMENTS`` elements, so the peak
does not grow with the batch or the image size.
"""

import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import native_torch

__all__ = ["deform_conv2d"]

Pair = Tuple[int, int]

# Columns of at most this many elements per chunk (16 MiB in float32). Besides bounding memory,
# this keeps the buffers small enough for the allocator to reuse them: fresh pages for larger
# ones cost as much as the sampling itself (measured: page faults on 70 MB columns ~0.05 s).
_CHUNK_ELEMENTS = 1 << 22
IMPLS = ("auto", "cpp", "torch")


def _kernels(t: torch.Tensor, impl: str):
    """The column-kernel module to use for tensors like ``t``."""
    if impl not in IMPLS:
        raise ValueError(f"Unknown native implementation {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        impl = os.environ.get("DCNV2_NATIVE_IMPL", "auto")
    cpp_ok = t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)
    if impl == "torch" or (impl == "auto" and not cpp_ok):
        return native_torch
    from . import native_cpp

    if impl == "cpp":
        if not cpp_ok:
            raise ValueError(
                f"The compiled native kernels support CPU float32/float64 tensors, got "
                f"{t.dtype} on {t.device}; use impl='torch'"
            )
        if not native_cpp.is_available(warn=False):
            raise RuntimeError(f"The compiled native kernels failed to build: {native_cpp.error()}")
        return native_cpp
    return native_cpp if native_cpp.is_available() else native_torch


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
    deformable_groups: int,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Modulated deformable convolution (DCNv1 when ``mask`` is None), arguments pre-validated.

    Args:
        input (Tensor): (N, C_in, H, W).
        offset (Tensor): (N, 2*G*kh*kw, Ho, Wo), G = ``deformable_groups``.
        mask (Tensor or None): (N, G*kh*kw, Ho, Wo).
        weight (Tensor): (C_out, C_in // groups, kh, kw).
        bias (Tensor or None): (C_out,).
        stride, padding, dilation ((int, int)): vertical and horizontal.
        groups, deformable_groups (int): convolution and offset groups.
        impl (str): "auto" (compiled kernels on CPU when they build, else PyTorch ops), "cpp"
            or "torch". The environment variable ``DCNV2_NATIVE_IMPL`` overrides "auto".

    Returns:
        Tensor: (N, C_out, Ho, Wo).
    """
    kernels = _kernels(input, impl)
    return _DeformConv2d.apply(
        input,
        offset,
        mask,
        weight,
        bias,
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        groups,
        deformable_groups,
        kernels,
    )


def _chunks(n: int, rows: int, positions: int):
    """Yield (images, p_begin, p_end) so that each chunk's columns (n_chunk, rows, Pc) stay
    within ``_CHUNK_ELEMENTS``: whole images when they fit, else ranges of output positions."""
    per_image = rows * positions
    if per_image <= _CHUNK_ELEMENTS:
        step = _CHUNK_ELEMENTS // per_image
        for start in range(0, n, step):
            yield slice(start, min(n, start + step)), 0, positions
        return
    step = max(1, _CHUNK_ELEMENTS // rows)
    for i in range(n):
        for p in range(0, positions, step):
            yield slice(i, i + 1), p, min(positions, p + step)


class _DeformConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, offset, mask, weight, bias, stride, padding, dilation, groups, dg, kernels):
        offset, weight = offset.contiguous(), weight.contiguous()
        mask = None if mask is None else mask.contiguous()
        ctx.conf = (stride, padding, dilation, groups, dg, kernels)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, offset, mask, weight)
        n, c = x.shape[:2]
        c_out, _, kh, kw = weight.shape
        ho, wo = offset.shape[2:]
        geometry = ((kh, kw), stride, padding, dilation, dg)
        # (groups, C_out/groups, C_in/groups*kh*kw): one matmul per group against the columns.
        w = weight.view(groups, c_out // groups, -1)
        out = x.new_empty(n, groups, c_out // groups, ho * wo)
        xp, images = None, None
        for sl, p0, p1 in _chunks(n, c * kh * kw, ho * wo):
            if sl != images:  # pad once per chunk of images; the kernels read 0 off the image
                images, xp = sl, F.pad(x[sl], (1, 1, 1, 1)).contiguous()
            m = None if mask is None else mask[sl]
            cols = kernels.im2col(xp, offset[sl], m, *geometry, p0, p1)
            out[sl, :, :, p0:p1] = torch.matmul(w, cols.view(cols.shape[0], groups, -1, p1 - p0))
        out = out.view(n, c_out, ho, wo)
        if bias is not None:
            out += bias.view(1, -1, 1, 1)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, offset, mask, weight = ctx.saved_tensors
        stride, padding, dilation, groups, dg, kernels = ctx.conf
        need_x, need_offset, need_mask, need_weight, need_bias = ctx.needs_input_grad[:5]
        need_mask = need_mask and mask is not None
        n, c, h, w_in = x.shape
        c_out, _, kh, kw = weight.shape
        ho, wo = offset.shape[2:]
        geometry = ((kh, kw), stride, padding, dilation, dg)
        w = weight.view(groups, c_out // groups, -1)
        go_all = grad_out.reshape(n, groups, c_out // groups, ho * wo)
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
        grad_offset = torch.empty_like(offset).view(n, -1, ho * wo) if need_offset else None
        grad_mask = torch.empty_like(mask).view(n, -1, ho * wo) if need_mask else None
        grad_w = torch.zeros_like(w) if need_weight else None
        images, grad_xp = None, None
        for sl, p0, p1 in _chunks(n, c * kh * kw, ho * wo):
            if sl != images:
                if need_x and images is not None:
                    grad_x[images] = grad_xp[:, :, 1:-1, 1:-1]
                images, xp = sl, F.pad(x[sl], (1, 1, 1, 1)).contiguous()
                grad_xp = torch.zeros_like(xp) if need_x else None
            m = None if mask is None else mask[sl]
            go = go_all[sl, :, :, p0:p1]
            if need_x or need_offset or need_mask:
                grad_cols = torch.matmul(w.transpose(1, 2), go).view(go.shape[0], -1, p1 - p0)
                # One pass gives the input gradient (into grad_xp), the offset and mask
                # gradients, and the columns for the weight gradient.
                g_offset, g_mask, cols = kernels.backward(
                    xp,
                    offset[sl],
                    m,
                    grad_cols,
                    *geometry,
                    p0,
                    p1,
                    grad_xp,
                    need_offset or need_mask,
                    need_weight,
                )
                del grad_cols
            elif need_weight:
                cols = kernels.im2col(xp, offset[sl], m, *geometry, p0, p1)
            if need_offset:
                grad_offset[sl, :, p0:p1] = g_offset
            if need_mask:
                grad_mask[sl, :, p0:p1] = g_mask
            if need_weight:
                cols = cols.view(cols.shape[0], groups, -1, p1 - p0)
                grad_w += torch.matmul(go, cols.transpose(2, 3)).sum(0)
                del cols  # at most two column-sized tensors alive at once
        if need_x and images is not None:
            # The padding collected corners outside the image, which detectron2 drops.
            grad_x[images] = grad_xp[:, :, 1:-1, 1:-1]
        if need_offset:
            grad_offset = grad_offset.view_as(offset)
        if need_mask:
            grad_mask = grad_mask.view_as(mask)
        grad_w = None if grad_w is None else grad_w.view_as(weight)
        grad_bias = grad_out.sum((0, 2, 3)) if ctx.has_bias and need_bias else None
        return (grad_x, grad_offset, grad_mask, grad_w, grad_bias) + (None,) * 6
