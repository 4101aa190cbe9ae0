"""A float64 reference of the deformable convolution, forward and every gradient.

Written from detectron2's CUDA kernels (bilinear sampling with ``floor`` held fixed) in plain
PyTorch ops, differentiated by autograd, independently of every backend; for small checks.
"""

import functools
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "TOLERANCES",
    "backend_errors",
    "known_difference",
    "deform_conv_reference",
    "output_size",
    "reference_cases",
]


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
    given = dict(input=x, offset=offset, mask=mask, weight=weight, bias=bias)
    leaves = {
        k: t.detach().double().cpu().requires_grad_() for k, t in given.items() if t is not None
    }
    xs, off, w = leaves["input"], leaves["offset"], leaves["weight"]
    n, c_in, height, width = xs.shape
    c_out, _, kh, kw = w.shape
    ho, wo = off.shape[2:]
    i, j = torch.meshgrid(torch.arange(kh), torch.arange(kw), indexing="ij")
    oh, ow = torch.meshgrid(torch.arange(ho), torch.arange(wo), indexing="ij")
    base_h = (i * dilation[0]).reshape(-1, 1) + (oh * stride[0] - padding[0]).reshape(1, -1)
    base_w = (j * dilation[1]).reshape(-1, 1) + (ow * stride[1] - padding[1]).reshape(1, -1)
    off = off.view(n, dg, kh * kw, 2, ho * wo)
    h, ww = base_h + off[:, :, :, 0], base_w + off[:, :, :, 1]  # (N, dg, K, P)
    inside = (h > -1) & (h < height) & (ww > -1) & (ww < width)
    # floor() has a zero derivative: the corners stay fixed, as in detectron2's kernels.
    hl, wl = h.floor(), ww.floor()
    lh, lw = h - hl, ww - wl
    planes = xs.view(n, dg, c_in // dg, height * width)
    val = 0
    for a, e in ((0, 0), (0, 1), (1, 0), (1, 1)):
        y, xx = hl.long() + a, wl.long() + e
        ok = inside & (y >= 0) & (y < height) & (xx >= 0) & (xx < width)
        index = (y.clamp(0, height - 1) * width + xx.clamp(0, width - 1)).view(n, dg, 1, -1)
        corner = planes.gather(3, index.expand(-1, -1, c_in // dg, -1))
        bilinear = (lh if a else 1 - lh) * (lw if e else 1 - lw) * ok
        val = val + corner.view(n, dg, -1, kh * kw, ho * wo) * bilinear[:, :, None]
    if mask is not None:
        val = val * leaves["mask"].view(n, dg, 1, kh * kw, ho * wo)
    cols = val.view(n, groups, c_in // groups, kh * kw, ho * wo)
    out = torch.einsum("ngckp,gock->ngop", cols, w.view(groups, -1, c_in // groups, kh * kw))
    out = out.reshape(n, c_out, ho, wo)
    if bias is not None:
        out = out + leaves["bias"][:, None, None]
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.detach().double().cpu())
    result = {k: None for k in given}
    result.update(zip(leaves, grads), out=out.detach())
    return result


def output_size(size, kernel, stride, padding, dilation) -> Tuple[int, int]:
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

    rand = functools.partial(torch.randn, generator=g, dtype=torch.float64)
    unit = functools.partial(torch.rand, generator=g, dtype=torch.float64)

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

    given = dict(input=case["x"], offset=case["offset"], mask=case["mask"] if modulated else None,
                 weight=case["weight"], bias=case["bias"])  # fmt: skip
    want = deform_conv_reference(*given.values(), case["grad_out"], *case["geometry"])
    leaves = {k: t.to(device, dtype).requires_grad_() for k, t in given.items() if t is not None}
    out = modulated_deform_conv(*map(leaves.get, given), *case["geometry"], backend=backend)
    grads = torch.autograd.grad(out, list(leaves.values()), case["grad_out"].to(out))
    got = {"out": out, **dict(zip(leaves, grads))}
    return {
        k: (
            (v.detach().double().cpu() - want[k]).abs().max() / want[k].abs().max().clamp(min=1e-12)
        ).item()
        for k, v in got.items()
    }
