"""Column kernels of the native backend in PyTorch ops (any device, any float dtype).

Input channels-last, padded by one pixel (n, H+2, W+2, C); columns (n, Pc, G, K, C/G) for output
positions [p_begin, p_end); detectron2's CUDA kernel semantics.
"""

from typing import List, NamedTuple, Optional, Tuple

import torch

__all__ = ["im2col", "backward", "crop_channels_first"]

Pair = Tuple[int, int]


class _Taps(NamedTuple):
    """Where every tap samples, for a chunk of images: tensors of shape (n, Pc, K, G_d)."""

    corner: torch.Tensor  # flat pixel index of the top-left corner in the padded image
    lh: torch.Tensor  # fractional parts, 0 for taps outside the open box
    lw: torch.Tensor
    bilinear: List[torch.Tensor]  # corner weights (tl, tr, bl, br) times the inside indicator
    inside: torch.Tensor  # 1 for taps inside the open box, else 0 (as the float dtype)
    mask: Optional[torch.Tensor]  # modulation, None for DCNv1


def _taps(xp, offset, mask, kernel, stride, padding, dilation, dg, positions) -> _Taps:
    n, _, ho, wo = offset.shape
    height, width = xp.shape[1] - 2, xp.shape[2] - 2
    kh, kw = kernel
    dtype, device = offset.dtype, offset.device
    i, j = torch.meshgrid(*(torch.arange(k, device=device) for k in kernel), indexing="ij")
    oh, ow = torch.meshgrid(*(torch.arange(k, device=device) for k in (ho, wo)), indexing="ij")
    # (Pc, K) positions of every tap before the offsets.
    base_h = (i * dilation[0]).reshape(-1, 1) + (oh * stride[0] - padding[0]).reshape(1, -1)
    base_w = (j * dilation[1]).reshape(-1, 1) + (ow * stride[1] - padding[1]).reshape(1, -1)
    base_h, base_w = (b[:, positions].t().to(dtype) for b in (base_h, base_w))
    # Offset channels of a group: (dy, dx) for tap 0, then tap 1, ...
    off = offset.view(n, dg, kh * kw, 2, ho * wo)[..., positions].permute(0, 4, 2, 1, 3)
    h = base_h[None, :, :, None] + off[..., 0]
    w = base_w[None, :, :, None] + off[..., 1]
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
    if mask is not None:
        mask = mask.view(n, dg, kh * kw, ho * wo)[..., positions].permute(0, 3, 2, 1)
    return _Taps(corner, lh, lw, bilinear, inside_f, mask)


def _corners(xp: torch.Tensor, taps: _Taps, dg: int):
    """Per corner: (gather index into xp viewed (n, HW, G_d, C/G_d), its bilinear weights)."""
    n, pc, k, _ = taps.corner.shape
    wp, c = xp.shape[2], xp.shape[3]
    for shift, weight in zip((0, 1, wp, wp + 1), taps.bilinear):
        index = (taps.corner + shift).reshape(n, pc * k, dg, 1).expand(-1, -1, -1, c // dg)
        yield index, weight.reshape(n, pc * k, dg, 1)


def _flat(xp: torch.Tensor, dg: int) -> torch.Tensor:
    n, hp, wp, c = xp.shape
    return xp.view(n, hp * wp, dg, c // dg)


def _to_columns(v: torch.Tensor, groups: int) -> torch.Tensor:
    """(n, Pc, K, C) -> the columns (n, Pc, K*C) ordered (group, tap, channel in group)."""
    n, pc, k, c = v.shape
    return v.view(n, pc, k, groups, c // groups).transpose(2, 3).reshape(n, pc, k * c)


def _from_columns(cols: torch.Tensor, k: int, groups: int) -> torch.Tensor:
    """The columns (n, Pc, K*C) -> (n, Pc, K, C)."""
    n, pc, kc = cols.shape
    c = kc // k
    return cols.view(n, pc, groups, k, c // groups).transpose(2, 3).reshape(n, pc, k, c)


def im2col(
    xp: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    kernel: Pair,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    dg: int,
    groups: int,
    p_begin: int,
    p_end: int,
) -> torch.Tensor:
    """Sampled, modulated columns of output positions [p_begin, p_end) of the Ho*Wo grid.

    Args:
        xp (Tensor): (n, H+2, W+2, C), the input channels-last, zero-padded by one pixel.
        offset (Tensor): (n, 2*G_d*kh*kw, Ho, Wo), G_d = ``dg`` deformable groups.
        mask (Tensor or None): (n, G_d*kh*kw, Ho, Wo).

    Returns:
        Tensor: (n, Pc, kh*kw*C), Pc = p_end - p_begin.
    """
    n, c = xp.shape[0], xp.shape[3]
    k = kernel[0] * kernel[1]
    taps = _taps(xp, offset, mask, kernel, stride, padding, dilation, dg, slice(p_begin, p_end))
    flat = _flat(xp, dg)
    v = None
    for index, weight in _corners(xp, taps, dg):
        term = flat.gather(1, index).mul_(weight)
        v = term if v is None else v.add_(term)
    if taps.mask is not None:  # detectron2: bilinear value, then the modulation
        v = v.mul_(taps.mask.reshape(n, -1, dg, 1))
    return _to_columns(v.view(n, p_end - p_begin, k, c), groups)


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
    groups: int,
    p_begin: int,
    p_end: int,
    grad_xp: Optional[torch.Tensor],
    need_coord: bool,
    need_cols: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """What backward needs from a chunk's column gradient ``grad_cols`` (n, Pc, kh*kw*C).

    Adds the input gradient to ``grad_xp`` (the caller crops its padding); returns offset gradient
    (n, 2*G_d*kh*kw, Pc) and mask gradient (n, G_d*kh*kw, Pc) and the columns, where asked.
    """
    n, c = xp.shape[0], xp.shape[3]
    k, pc = kernel[0] * kernel[1], p_end - p_begin
    taps = _taps(xp, offset, mask, kernel, stride, padding, dilation, dg, slice(p_begin, p_end))
    gc = _from_columns(grad_cols, k, groups).reshape(n, pc * k, dg, c // dg)
    scale = taps.inside if taps.mask is None else taps.inside * taps.mask  # (n, Pc, K, G_d)
    if grad_xp is not None:
        # detectron2's modulated_deformable_col2im: corner weight * (grad_col * mask).
        top = gc if taps.mask is None else gc * taps.mask.reshape(n, -1, dg, 1)
        target = _flat(grad_xp, dg)
        for index, weight in _corners(xp, taps, dg):
            target.scatter_add_(1, index, top * weight)
    grad_offset = grad_mask = cols = None
    if need_coord:
        flat = _flat(xp, dg)
        # s[q] = sum over the group's channels of grad_col * corner value q: (n, Pc, K, G_d).
        s = [
            (flat.gather(1, index) * gc).sum(3).view_as(scale)
            for index, _ in _corners(xp, taps, dg)
        ]
        lh, lw = taps.lh, taps.lw
        # d/dh and d/dw of the bilinear formula with floor(h), floor(w) fixed.
        grad_h = ((1 - lw) * (s[2] - s[0]) + lw * (s[3] - s[1])) * scale
        grad_w = ((1 - lh) * (s[1] - s[0]) + lh * (s[3] - s[2])) * scale
        # (n, Pc, K, G_d, 2) -> channels (group, tap, dy/dx).
        grad_offset = torch.stack([grad_h, grad_w], 4).permute(0, 3, 2, 4, 1).reshape(n, -1, pc)
        if mask is not None:
            grad_mask = sum(b * sq for b, sq in zip(taps.bilinear, s))
            grad_mask = grad_mask.permute(0, 3, 2, 1).reshape(n, -1, pc)
    if need_cols:
        cols = im2col(
            xp, offset, mask, kernel, stride, padding, dilation, dg, groups, p_begin, p_end
        )
    return grad_offset, grad_mask, cols


def crop_channels_first(xp: torch.Tensor) -> torch.Tensor:
    """(n, H+2, W+2, C) -> (n, C, H, W) without the one-pixel padding."""
    return xp[:, 1:-1, 1:-1].permute(0, 3, 1, 2).contiguous()
