"""Column kernels of the native backend written with PyTorch ops (any device, any float dtype).

They reproduce detectron2's CUDA kernels (``deform_conv_cuda_kernel.cu``): a tap samples
``p = (ho*sh - ph + i*dh + dy, wo*sw - pw + j*dw + dx)`` only when ``-1 < p_h < H`` and
``-1 < p_w < W``; bilinear interpolation from the corners ``floor(p)`` and ``floor(p) + 1`` with
corners outside the image reading 0. The gradients are the exact derivatives of that formula
with ``floor`` held fixed (so at integer coordinates the high corner's slope is used, and it
reads 0 past the last row or column), and are 0 for taps outside the open box.

Interface and layouts shared with :mod:`dcnv2.layers.native_cpp`: the input comes zero-padded by
one pixel (``xp``) so corners outside the image read 0 without a test; columns are
``(n, C*kh*kw, Pc)`` with channel-major rows (a grouped convolution is one batched matmul) for a
range ``[p_begin, p_end)`` of the flattened ``Ho*Wo`` output positions, so the driver can bound
their size.
"""

from typing import List, NamedTuple, Optional, Tuple

import torch

__all__ = ["im2col", "col2im_input", "col2im_coord"]

Pair = Tuple[int, int]


class _Taps(NamedTuple):
    """Where every tap samples, for a chunk of images: tensors of shape (n, G, K*Pc)."""

    corner: torch.Tensor  # flat index of the top-left corner in the 1-pixel zero-padded image
    lh: torch.Tensor  # fractional parts, 0 for taps outside the open box
    lw: torch.Tensor
    bilinear: List[torch.Tensor]  # corner weights (tl, tr, bl, br) times the inside indicator
    inside: torch.Tensor  # 1 for taps inside the open box, else 0 (as the float dtype)


def _taps(xp, offset, kernel, stride, padding, dilation, dg, positions) -> _Taps:
    n, _, ho, wo = offset.shape
    height, width = xp.shape[2] - 2, xp.shape[3] - 2
    kh, kw = kernel
    dtype, device = offset.dtype, offset.device
    ar = torch.arange
    # Integer part of each tap's position, (K, Pc), before the learned shift.
    base_h = (ar(kh, device=device) * dilation[0]).view(kh, 1, 1, 1) + (
        ar(ho, device=device) * stride[0] - padding[0]
    ).view(1, 1, ho, 1)
    base_w = (ar(kw, device=device) * dilation[1]).view(1, kw, 1, 1) + (
        ar(wo, device=device) * stride[1] - padding[1]
    ).view(1, 1, 1, wo)
    base_h = base_h.expand(kh, kw, ho, wo).reshape(kh * kw, ho * wo)[:, positions].to(dtype)
    base_w = base_w.expand(kh, kw, ho, wo).reshape(kh * kw, ho * wo)[:, positions].to(dtype)
    off = offset.view(n, dg, kh * kw, 2, ho * wo)[..., positions]
    h = (base_h + off[:, :, :, 0]).reshape(n, dg, -1)
    w = (base_w + off[:, :, :, 1]).reshape(n, dg, -1)
    inside = (h > -1) & (h < height) & (w > -1) & (w < width)
    # Outside taps get a harmless in-range corner and zero weights (also keeps NaN out of .long()).
    h_low = torch.where(inside, h.floor(), torch.zeros_like(h))
    w_low = torch.where(inside, w.floor(), torch.zeros_like(w))
    lh = torch.where(inside, h - h_low, torch.zeros_like(h))
    lw = torch.where(inside, w - w_low, torch.zeros_like(w))
    corner = (h_low.long() + 1) * (width + 2) + (w_low.long() + 1)
    inside_f = inside.to(dtype)
    hh, hw = 1 - lh, 1 - lw
    bilinear = [hh * hw * inside_f, hh * lw * inside_f, lh * hw * inside_f, lh * lw * inside_f]
    return _Taps(corner, lh, lw, bilinear, inside_f)


def _corner_shifts(xp: torch.Tensor) -> Tuple[int, int, int, int]:
    wp = xp.shape[3]
    return (0, 1, wp, wp + 1)


def _mask(mask: Optional[torch.Tensor], dg: int, kernel: Pair, positions: slice):
    if mask is None:
        return None
    n, _, ho, wo = mask.shape
    return mask.view(n, dg, kernel[0] * kernel[1], ho * wo)[..., positions].reshape(n, dg, -1)


def im2col(
    xp: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    kernel: Pair,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    dg: int,
    p_begin: int,
    p_end: int,
) -> torch.Tensor:
    """Sampled, modulated columns of output positions [p_begin, p_end) of the Ho*Wo grid.

    Args:
        xp (Tensor): (n, C, H+2, W+2), the input zero-padded by one pixel on each side.
        offset (Tensor): (n, 2*G*kh*kw, Ho, Wo).
        mask (Tensor or None): (n, G*kh*kw, Ho, Wo).

    Returns:
        Tensor: (n, C*kh*kw, Pc), Pc = p_end - p_begin; row ``c*kh*kw + k`` holds channel c
        sampled by tap k.
    """
    n, c = xp.shape[:2]
    positions = slice(p_begin, p_end)
    taps = _taps(xp, offset, kernel, stride, padding, dilation, dg, positions)
    flat = xp.reshape(n, dg, c // dg, -1)
    m = _mask(mask, dg, kernel, positions)
    cols = None
    for shift, b in zip(_corner_shifts(xp), taps.bilinear):
        index = (taps.corner + shift).unsqueeze(2).expand(-1, -1, c // dg, -1)
        a = (b if m is None else b * m).unsqueeze(2)
        v = flat.gather(3, index)
        cols = v.mul_(a) if cols is None else cols.addcmul_(v, a)
    return cols.view(n, c * kernel[0] * kernel[1], p_end - p_begin)


def col2im_input(
    xp: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    grad_cols: torch.Tensor,
    kernel: Pair,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    dg: int,
    p_begin: int,
    p_end: int,
    grad_xp: torch.Tensor,
) -> None:
    """Add the input gradient of columns ``grad_cols`` (n, C*kh*kw, Pc) to ``grad_xp`` (like xp).

    What lands on the padding belongs to corners outside the image: the caller crops it.
    """
    n, c = xp.shape[:2]
    positions = slice(p_begin, p_end)
    taps = _taps(xp, offset, kernel, stride, padding, dilation, dg, positions)
    m = _mask(mask, dg, kernel, positions)
    gc = grad_cols.reshape(n, dg, c // dg, -1)
    flat = grad_xp.view(n, dg, c // dg, -1)
    for shift, b in zip(_corner_shifts(xp), taps.bilinear):
        index = (taps.corner + shift).unsqueeze(2).expand(-1, -1, c // dg, -1)
        a = (b if m is None else b * m).unsqueeze(2)
        flat.scatter_add_(3, index, gc * a)


def col2im_coord(
    xp: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    grad_cols: torch.Tensor,
    kernel: Pair,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    dg: int,
    p_begin: int,
    p_end: int,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of offset (n, 2*G*kh*kw, Pc) and mask (n, G*kh*kw, Pc; None for DCNv1)."""
    n, c = xp.shape[:2]
    positions = slice(p_begin, p_end)
    taps = _taps(xp, offset, kernel, stride, padding, dilation, dg, positions)
    flat = xp.reshape(n, dg, c // dg, -1)
    gc = grad_cols.reshape(n, dg, c // dg, -1)
    # s[q] = sum over the group's channels of grad_col * corner value q.
    s = []
    for shift in _corner_shifts(xp):
        index = (taps.corner + shift).unsqueeze(2).expand(-1, -1, c // dg, -1)
        s.append((flat.gather(3, index) * gc).sum(2))
    lh, lw = taps.lh, taps.lw
    # d/dh and d/dw of the bilinear formula with floor(h), floor(w) fixed.
    grad_h = (1 - lw) * (s[2] - s[0]) + lw * (s[3] - s[1])
    grad_w = (1 - lh) * (s[1] - s[0]) + lh * (s[3] - s[2])
    m = _mask(mask, dg, kernel, positions)
    scale = taps.inside if m is None else taps.inside * m
    k, pc = kernel[0] * kernel[1], p_end - p_begin
    grad_offset = torch.stack([grad_h * scale, grad_w * scale], 2)  # (n, G, 2, K*Pc)
    grad_offset = grad_offset.view(n, dg, 2, k, pc).transpose(2, 3).reshape(n, 2 * dg * k, pc)
    grad_mask = None
    if mask is not None:
        grad_mask = sum(b * sq for b, sq in zip(taps.bilinear, s)).view(n, dg * k, pc)
    return grad_offset, grad_mask


def backward(
    xp: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    grad_cols: torch.Tensor,
    kernel: Pair,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    dg: int,
    p_begin: int,
    p_end: int,
    grad_xp: Optional[torch.Tensor],
    need_coord: bool,
    need_cols: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """What backward needs from a chunk's column gradient ``grad_cols`` (n, C*kh*kw, Pc): adds
    the input gradient to ``grad_xp`` when given, and returns the offset and mask gradients
    (when ``need_coord``; see :func:`col2im_coord`) and the columns (when ``need_cols``)."""
    args = (xp, offset, mask, grad_cols, kernel, stride, padding, dilation, dg, p_begin, p_end)
    if grad_xp is not None:
        col2im_input(*args, grad_xp)
    grad_offset, grad_mask = col2im_coord(*args) if need_coord else (None, None)
    cols = None
    if need_cols:
        cols = im2col(xp, offset, mask, kernel, stride, padding, dilation, dg, p_begin, p_end)
    return grad_offset, grad_mask, cols
