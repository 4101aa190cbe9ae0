"""A float64 NumPy reference of the deformable convolution, forward and every gradient.

Written from detectron2's CUDA kernels independently of every backend; slow, for small checks.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "TOLERANCES",
    "backend_errors",
    "known_difference",
    "deform_conv_reference",
    "output_size",
    "reference_cases",
]

_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))


def _corner_weights(lh: np.ndarray, lw: np.ndarray):
    return ((1 - lh) * (1 - lw), (1 - lh) * lw, lh * (1 - lw), lh * lw)


def deform_conv_reference(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    grad_out: torch.Tensor,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
    dg: int = 1,
) -> Dict[str, Optional[torch.Tensor]]:
    """Output and gradients of ``sum(out * grad_out)``, in float64 on the CPU.

    Args:
        x: (N, C_in, H, W).
        offset: (N, 2*dg*kh*kw, Ho, Wo); channel ``g*2*kh*kw + 2*k`` is dy of tap ``k``, ``+1`` dx.
        mask: (N, dg*kh*kw, Ho, Wo), or None for DCNv1.
        weight: (C_out, C_in // groups, kh, kw).
        bias: (C_out,) or None.
        grad_out: (N, C_out, Ho, Wo), the upstream gradient.

    Returns:
        ``{"out", "input", "offset", "mask", "weight", "bias"}``: float64 CPU tensors (None if not
        given).
    """
    xs, off, w, go = (t.detach().double().cpu().numpy() for t in (x, offset, weight, grad_out))
    m = None if mask is None else mask.detach().double().cpu().numpy()
    n, c_in, height, width = xs.shape
    c_out, cin_g, kh, kw = w.shape
    ho, wo = off.shape[2:]
    taps, cout_g = kh * kw, c_out // groups
    oh, ow = np.meshgrid(np.arange(ho), np.arange(wo), indexing="ij")
    out = np.zeros((n, c_out, ho, wo))
    grad = {
        "input": np.zeros_like(xs),
        "offset": np.zeros_like(off),
        "mask": None if m is None else np.zeros_like(m),
        "weight": np.zeros_like(w),
    }
    for b in range(n):
        for c in range(c_in):
            g, grp = c // (c_in // dg), c // cin_g
            outs = slice(grp * cout_g, (grp + 1) * cout_g)
            plane = xs[b, c]
            for i in range(kh):
                for j in range(kw):
                    k = i * kw + j
                    dy_c, dx_c = g * 2 * taps + 2 * k, g * 2 * taps + 2 * k + 1
                    h = oh * stride[0] - padding[0] + i * dilation[0] + off[b, dy_c]
                    ww = ow * stride[1] - padding[1] + j * dilation[1] + off[b, dx_c]
                    inside = (h > -1) & (h < height) & (ww > -1) & (ww < width)
                    hl, wl = np.floor(h).astype(int), np.floor(ww).astype(int)
                    lh, lw = h - hl, ww - wl
                    values, valid = [], []
                    for a, e in _CORNERS:
                        y, xx = hl + a, wl + e
                        ok = inside & (y >= 0) & (y < height) & (xx >= 0) & (xx < width)
                        yc, xc = np.clip(y, 0, height - 1), np.clip(xx, 0, width - 1)
                        values.append(np.where(ok, plane[yc, xc], 0.0))
                        valid.append((ok, yc, xc))
                    cw = _corner_weights(lh, lw)
                    val = sum(c_w * v for c_w, v in zip(cw, values))
                    mk = np.ones_like(h) if m is None else m[b, g * taps + k]
                    col = val * mk
                    wk = w[outs, c - grp * cin_g, i, j]  # (cout_g,)
                    out[b, outs] += wk[:, None, None] * col
                    grad["weight"][outs, c - grp * cin_g, i, j] += np.einsum(
                        "ohw,hw->o", go[b, outs], col
                    )
                    top = np.einsum("o,ohw->hw", wk, go[b, outs])  # gradient of the column
                    for c_w, (ok, yc, xc) in zip(cw, valid):
                        np.add.at(grad["input"][b, c], (yc[ok], xc[ok]), (c_w * top * mk)[ok])
                    v00, v01, v10, v11 = values
                    coord_h = -(1 - lw) * v00 - lw * v01 + (1 - lw) * v10 + lw * v11
                    coord_w = -(1 - lh) * v00 + (1 - lh) * v01 - lh * v10 + lh * v11
                    grad["offset"][b, dy_c] += np.where(inside, coord_h * top * mk, 0.0)
                    grad["offset"][b, dx_c] += np.where(inside, coord_w * top * mk, 0.0)
                    if m is not None:
                        grad["mask"][b, g * taps + k] += val * top
    if bias is not None:
        out += bias.detach().double().cpu().numpy()[None, :, None, None]
    result = {"out": torch.from_numpy(out)}
    for name, value in grad.items():
        result[name] = None if value is None else torch.from_numpy(value)
    result["bias"] = None if bias is None else torch.from_numpy(go.sum(axis=(0, 2, 3)))
    return result


def output_size(
    size: Tuple[int, int], kernel: Tuple[int, int], stride, padding, dilation
) -> Tuple[int, int]:
    """(Ho, Wo) of a convolution of an (H, W) input."""
    return tuple(
        (size[d] + 2 * padding[d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1
        for d in range(2)
    )


# Largest error allowed, relative to the largest reference magnitude of each tensor.
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4}


def reference_cases(quick: bool = False) -> List[Dict]:
    """The checked cases ("random", "integer", "border"): float64 CPU arguments and geometry."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def unit(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    size = (7, 9) if quick else (9, 11)
    ho, wo = output_size((8, 10), (3, 3), (2, 2), (2, 2), (2, 2))
    halves = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    cases = [
        dict(name="random", x=rand(2, 4, *size), offset=rand(2, 36, *size) * 2.5,
             mask=unit(2, 18, *size), weight=rand(6, 2, 3, 3), bias=rand(6),
             geometry=((1, 1), (1, 1), (1, 1), 2, 2), integer_points=False),
        dict(name="integer", x=rand(1, 4, 8, 10),
             offset=torch.randint(-3, 4, (1, 18, ho, wo), generator=g).double(),
             mask=unit(1, 9, ho, wo), weight=rand(3, 4, 3, 3), bias=rand(3),
             geometry=((2, 2), (2, 2), (2, 2), 1, 1), integer_points=True),
        dict(name="border", x=rand(2, 4, 4, 5),
             offset=halves[torch.randint(0, 6, (2, 36, 4, 5), generator=g)],
             mask=unit(2, 18, 4, 5), weight=rand(2, 4, 3, 3), bias=rand(2),
             geometry=((1, 1), (1, 1), (1, 1), 1, 2), integer_points=True),
    ]  # fmt: skip
    for case in cases:
        n, c_out, (oh, ow) = case["x"].shape[0], case["weight"].shape[0], case["offset"].shape[2:]
        case["grad_out"] = rand(n, c_out, oh, ow)
    return cases


def known_difference(backend: str, case: Dict, tensor: str) -> bool:
    """Whether ``tensor``'s error is torchvision's known convention at integer points."""
    return backend == "torchvision" and case["integer_points"] and tensor in ("offset", "mask")


def backend_errors(
    case: Dict, backend: str, modulated: bool, dtype: torch.dtype, device="cpu"
) -> Dict[str, float]:
    """Per tensor name: one backend's largest error on a case, over the largest reference value."""
    from .deform_conv import modulated_deform_conv

    stride, padding, dilation, groups, dg = case["geometry"]
    mask = case["mask"] if modulated else None
    want = deform_conv_reference(
        case["x"], case["offset"], mask, case["weight"], case["bias"], case["grad_out"],
        stride, padding, dilation, groups, dg,
    )  # fmt: skip
    names = ["input", "offset"] + (["mask"] if modulated else []) + ["weight", "bias"]
    sources = dict(input=case["x"], offset=case["offset"], mask=mask, weight=case["weight"],
                   bias=case["bias"])  # fmt: skip
    leaves = {k: sources[k].to(device, dtype).requires_grad_() for k in names}
    out = modulated_deform_conv(
        leaves["input"], leaves["offset"], leaves.get("mask"), leaves["weight"], leaves["bias"],
        stride, padding, dilation, groups, dg, backend=backend,
    )  # fmt: skip
    grads = torch.autograd.grad(out, [leaves[k] for k in names], case["grad_out"].to(out))
    got = dict(zip(names, grads), out=out)
    return {
        k: (
            (got[k].detach().double().cpu() - want[k]).abs().max()
            / want[k].abs().max().clamp(min=1e-12)
        ).item()
        for k in ["out"] + names
    }
