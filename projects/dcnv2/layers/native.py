"""The "native" deformable-convolution backend: detectron2's exact semantics on any device.

im2col into channels-last columns and a product with the weight, by compiled CPU kernels
(:mod:`.native_cpp`) or PyTorch ops (:mod:`.native_torch`); each pass runs "chunked" or "fused"
(``forward_packed``/``backward_packed``), whichever :func:`_run_fastest` measures faster.
"""

import functools
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import native_torch
from .backends import resolve_native_impl

__all__ = ["forward", "backward", "chosen_ways"]

Pair = Tuple[int, int]

# Columns per chunk (16 MiB in float32): bounds memory and lets the allocator reuse buffers.
_CHUNK_ELEMENTS = 1 << 22
# Fastest way per (product, weight shape, dtype, threads); not per size, which varies in training.
_FASTEST: Dict[Tuple, str] = {}
# Smaller chunk products run the first way, unmeasured: too short to time or to matter.
_MEASURE_MACS = 1 << 27


def chosen_ways() -> Dict[str, str]:
    """The ways kept so far by :func:`_run_fastest`, e.g. ``{"forward_pass ...": "fused"}``."""
    return {
        " ".join(str(part).replace("torch.", "") for part in key): way
        for key, way in _FASTEST.items()
    }


def _kernels(t: torch.Tensor, impl: str):
    """The column-kernel module to use for tensors like ``t``."""
    impl = resolve_native_impl(impl)
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


def _chunks(n: int, rows: int, positions: int):
    """Yield (images, p_begin, p_end) chunks whose columns stay within ``_CHUNK_ELEMENTS``."""
    per_image = rows * positions
    if per_image <= _CHUNK_ELEMENTS:
        step = _CHUNK_ELEMENTS // per_image
        for start in range(0, n, step):
            yield slice(start, min(n, start + step)), 0, positions
        return
    pieces = -(-positions // max(1, _CHUNK_ELEMENTS // rows))
    step = -(-positions // pieces)
    for i in range(n):
        for p in range(0, positions, step):
            yield slice(i, i + 1), p, min(positions, p + step)


def _pad_channels_last(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H+2, W+2, C), contiguous, zero-padded by one pixel."""
    n, c, h, w = x.shape
    xp = x.new_empty(n, h + 2, w + 2, c)
    for border in (xp[:, 0], xp[:, -1], xp[:, 1:-1, 0], xp[:, 1:-1, -1]):
        border.zero_()
    xp[:, 1:-1, 1:-1].copy_(x.permute(0, 2, 3, 1))
    return xp


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out = a @ b, straight into ``out`` when its layout allows."""
    if out.stride(-1) == 1 and out.stride(0) >= max(1, out.shape[1]):
        torch.mm(a, b, out=out)
    else:
        out.copy_(torch.mm(a, b))


def _addmm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    out.addmm_(a, b)


def _weight_first(w: torch.Tensor, cols: torch.Tensor, out: torch.Tensor, mm=_mm) -> None:
    """``out[b, group rows] = w[group] @ cols[b, :, group].T``: straight into the output."""
    groups, cog = w.shape[:2]
    for b in range(cols.shape[0]):
        for grp in range(groups):
            mm(w[grp], cols[b, :, grp].t(), out[b, grp * cog : (grp + 1) * cog])


def _columns_first(w: torch.Tensor, cols: torch.Tensor, out: torch.Tensor) -> None:
    """``cols @ w[group].T`` (n, Pc, C_out), one matmul per group, then one transposing copy."""
    groups, cog = w.shape[:2]
    nc, pc = cols.shape[:2]
    prod = cols.new_empty(nc * pc, groups * cog)
    rows = cols.view(nc * pc, groups, -1)
    for grp in range(groups):
        _mm(rows[:, grp], w[grp].t(), prod[:, grp * cog : (grp + 1) * cog])
    out.copy_(prod.view(nc, pc, -1).transpose(1, 2))


def _packed_gemm_ok(t: torch.Tensor, kernels) -> bool:
    """Whether the compiled ``kernels``' packed float32 ``gemm`` can run products of ``t``."""
    if kernels is native_torch or t.device.type != "cpu" or t.dtype != torch.float32:
        return False
    return kernels.gemm_supported()


def _run_fastest(
    key: Tuple, ways: Dict[str, Callable[[], None]], outs: Sequence[torch.Tensor], macs: int
) -> None:
    """Run the fastest of ``ways`` (each computing the same values into ``outs``) on this CPU.

    The first call for ``key`` of at least ``_MEASURE_MACS`` multiply-adds times each way and keeps
    the fastest in ``_FASTEST[key]``; until then, and for smaller work, the first way runs.
    """
    name = _FASTEST.get(key)
    device = outs[0].device.type if outs else "cpu"
    if name is None and len(ways) > 1 and device == "cpu" and macs >= _MEASURE_MACS:
        before = [out.clone() for out in outs]
        best = dict.fromkeys(ways, float("inf"))

        def restore():
            for out, saved in zip(outs, before):
                out.copy_(saved)

        for _ in range(2):
            for way, run in ways.items():
                restore()
                start = time.perf_counter()
                run()
                best[way] = min(best[way], time.perf_counter() - start)
        name = _FASTEST[key] = min(best, key=best.get)
        if name == way:  # the last way run: its result stands
            return
        restore()
    ways[name or next(iter(ways))]()


def _weight_times_columns(w: torch.Tensor, cols: torch.Tensor, out: torch.Tensor, kernels) -> None:
    """``out[b, group rows] = w[group] @ cols[b, :, group].T`` by the fastest way.

    Args:
        w (Tensor): (G, C_out/G, K*C/G), the weight of :func:`_weight_rows`.
        cols (Tensor): (n, Pc, G, K*C/G), a chunk's columns.
        out (Tensor): (n, C_out, Pc), where the chunk's output goes (may be strided).
    """
    ways = {"weight_first": _weight_first, "columns_first": _columns_first}
    if _packed_gemm_ok(cols, kernels):
        ways["packed"] = functools.partial(_weight_first, mm=kernels.gemm)
    key = ("forward", tuple(w.shape), cols.dtype, torch.get_num_threads())
    ways = {k: functools.partial(f, w, cols, out) for k, f in ways.items()}
    _run_fastest(key, ways, [out], cols.numel() * w.shape[1])


def _group_products(kind: str, w_shape, products: List[Tuple], out, macs: int, kernels, add=False):
    """``c = a @ b`` (``c += a @ b`` when ``add``) for each ``(a, b, c)`` of ``products``, slices of
    ``out``, by MKL or the packed gemm, whichever measures faster for ``(kind, w_shape)``."""

    def run(mm):
        def way():
            for a, b, c in products:
                mm(a, b, c)

        return way

    ways = {"mkl": run(_addmm if add else _mm)}
    if _packed_gemm_ok(out, kernels):
        ways["packed"] = run(functools.partial(kernels.gemm, accumulate=add))
    key = (kind, tuple(w_shape), out.dtype, torch.get_num_threads())
    _run_fastest(key, ways, [out], macs)


def _image_groups(images: slice, groups: int, group_out: int):
    """Yield (i, b, grp, rows): one matmul per chunk image and convolution group."""
    for i, b in enumerate(range(images.start, images.stop)):
        for grp in range(groups):
            yield i, b, grp, slice(grp * group_out, (grp + 1) * group_out)


def forward(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
    dg: int,
    impl: str = "auto",
) -> torch.Tensor:
    """Modulated deformable convolution (DCNv1 when ``mask`` is None), arguments pre-validated,
    by the faster of the chunked and the fused way; ``torch.ops.dcnv2.deform_conv2d`` calls it.

    Args:
        x (Tensor): (N, C_in, H, W).
        offset (Tensor): (N, 2*G*kh*kw, Ho, Wo), G = ``dg`` (deformable groups).
        mask (Tensor or None): (N, G*kh*kw, Ho, Wo).
        weight (Tensor): (C_out, C_in // groups, kh, kw).
        bias (Tensor or None): (C_out,).
        impl (str): "auto" (compiled kernels on CPU if they build, else PyTorch), "cpp", "torch".

    Returns:
        Tensor: (N, C_out, Ho, Wo).
    """
    kernels = _kernels(x, impl)
    offset = offset.contiguous()
    mask = None if mask is None else mask.contiguous()
    n, c = x.shape[:2]
    c_out, cg, kh, kw = weight.shape
    ho, wo = offset.shape[2:]
    geometry = ((kh, kw), stride, padding, dilation, dg, groups)
    out = x.new_empty(n, c_out, ho * wo)
    xp = _pad_channels_last(x)

    def chunked(target):
        w = _weight_rows(weight, groups)
        for sl, p0, p1 in _chunks(n, c * kh * kw, ho * wo):
            m = None if mask is None else mask[sl]
            cols = kernels.im2col(xp[sl], offset[sl], m, *geometry, p0, p1)
            cols = cols.view(cols.shape[0], p1 - p0, groups, -1)
            _weight_times_columns(w, cols, target[sl, :, p0:p1], kernels)
            del cols

    ways = {"chunked": chunked}
    if groups == 1 and _packed_gemm_ok(x, kernels):
        # The weight is packed inside the way: a process that keeps the chunked way never pays.
        ways["fused"] = lambda target: kernels.forward_packed(
            xp, offset, mask, kernels.pack_rows16(weight), *geometry[:-1], target
        )
    key = ("forward_pass", tuple(weight.shape), x.dtype, torch.get_num_threads())
    ways = {k: functools.partial(f, out) for k, f in ways.items()}
    _run_fastest(key, ways, [out], out.numel() * cg * kh * kw)
    out = out.view(n, c_out, ho, wo)
    if bias is not None:
        out += bias.view(1, -1, 1, 1)
    return out


def backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: torch.Tensor,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
    dg: int,
    needs: Sequence[bool],
    impl: str = "auto",
) -> List[Optional[torch.Tensor]]:
    """Gradients of :func:`forward`.

    Args:
        grad_out (Tensor): (N, C_out, Ho, Wo).
        needs (5 bools): which of the gradients of input, offset, mask, weight, bias to compute.

    Returns:
        list: [grad_input, grad_offset, grad_mask, grad_weight, grad_bias]; None where not needed.
    """
    kernels = _kernels(x, impl)
    need_x, need_offset, need_mask, need_weight, need_bias = needs
    offset = offset.contiguous()
    mask = None if mask is None else mask.contiguous()
    need_mask = need_mask and mask is not None
    need_coord = need_offset or need_mask
    n, c = x.shape[:2]
    c_out, cg, kh, kw = weight.shape
    ho, wo = offset.shape[2:]
    geometry = ((kh, kw), stride, padding, dilation, dg, groups)
    cog = c_out // groups
    go = grad_out.contiguous().view(n, c_out, ho * wo)
    xp = _pad_channels_last(x)
    grad_xp = torch.zeros_like(xp) if need_x else None
    grad_offset = offset.new_empty(n, offset.shape[1], ho * wo) if need_offset else None
    grad_mask = mask.new_empty(n, mask.shape[1], ho * wo) if need_mask else None
    grad_w = x.new_zeros(groups, cog, kh * kw * cg) if need_weight else None

    def chunked():
        w = _weight_rows(weight, groups)
        for sl, p0, p1 in _chunks(n, c * kh * kw, ho * wo):
            m = None if mask is None else mask[sl]
            pc = p1 - p0
            if need_x or need_coord:
                grad_cols = x.new_empty(sl.stop - sl.start, pc, groups, w.shape[2])
                products = [
                    (go[b, rows, p0:p1].t(), w[grp], grad_cols[i, :, grp])
                    for i, b, grp, rows in _image_groups(sl, groups, cog)
                ]
                macs = grad_cols.numel() * cog
                _group_products("column_gradient", w.shape, products, grad_cols, macs, kernels)
                g_offset, g_mask, cols = kernels.backward(
                    xp[sl], offset[sl], m, grad_cols.view(grad_cols.shape[0], pc, -1), *geometry,
                    p0, p1, grad_xp[sl] if need_x else None, need_coord, need_weight,
                )  # fmt: skip
                del grad_cols, products
            elif need_weight:
                cols = kernels.im2col(xp[sl], offset[sl], m, *geometry, p0, p1)
            if need_offset:
                grad_offset[sl, :, p0:p1] = g_offset
            if need_mask:
                grad_mask[sl, :, p0:p1] = g_mask
            if need_weight:
                cols = cols.view(cols.shape[0], pc, groups, -1)
                products = [
                    (go[b, rows, p0:p1], cols[i, :, grp], grad_w[grp])
                    for i, b, grp, rows in _image_groups(sl, groups, cog)
                ]
                macs = cols.numel() * cog
                _group_products("weight_gradient", w.shape, products, grad_w, macs, kernels, True)
                del cols, products  # at most two column-sized tensors alive at once

    ways = {"chunked": chunked}
    if groups == 1 and _packed_gemm_ok(x, kernels):
        ways["fused"] = lambda: kernels.backward_packed(
            xp, offset, mask, go, weight.contiguous(), *geometry[:-1], grad_xp, grad_offset,
            grad_mask, None if grad_w is None else grad_w[0],
        )  # fmt: skip
    outs = [t for t in (grad_xp, grad_offset, grad_mask, grad_w) if t is not None]
    key = ("backward_pass", tuple(weight.shape), (need_x, need_offset, need_mask, need_weight),
           x.dtype, torch.get_num_threads())  # fmt: skip
    _run_fastest(key, ways, outs, n * ho * wo * c_out * kh * kw * cg)
    # The padding collected corners outside the image, which detectron2 drops.
    grad_x = kernels.crop_channels_first(grad_xp) if need_x else None
    grad_offset = grad_offset.view_as(offset) if need_offset else None
    grad_mask = grad_mask.view_as(mask) if need_mask else None
    if need_weight:
        grad_w = grad_w.view(groups, cog, kh * kw, cg).transpose(2, 3).reshape_as(weight)
    grad_bias = grad_out.sum((0, 2, 3)) if need_bias else None
    return [grad_x, grad_offset, grad_mask, grad_w, grad_bias]


def _weight_rows(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(C_out, C/G, kh, kw) -> (G, C_out/G, kh*kw*C/G), columns ordered (tap, channel)."""
    c_out, cg, kh, kw = weight.shape
    return (
        weight.reshape(groups, c_out // groups, cg, kh * kw)
        .transpose(2, 3)
        .reshape(groups, c_out // groups, kh * kw * cg)
    )
