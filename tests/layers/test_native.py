"""The native backend against detectron2's kernel semantics, including the exact-integer and
border cases where torchvision's gradient differs; its compiled and PyTorch kernels agree."""

import logging

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.utils import _pair

from dcnv2.layers import (
    DeformConv,
    ModulatedDeformConv,
    ModulatedDeformRoIAlign,
    available_backends,
    backends,
    mdpool_cpp,
    modulated_deform_conv,
    native,
    native_cpp,
    native_torch,
)
from dcnv2.layers.extension import JitExtension

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
IMPLS = ["torch"] + (["cpp"] if native_cpp.is_available() else [])


def _native(
    x, offset, mask, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, dg=1, impl="auto"
):
    """The native backend through the custom operator, with its registered backward."""
    stride, padding, dilation = (list(_pair(v)) for v in (stride, padding, dilation))
    return torch.ops.dcnv2.deform_conv2d(
        x, offset, mask, weight, bias, stride, padding, dilation, groups, dg, "native", impl
    )


def detectron2_reference(x, offset, mask, weight, grad_out, stride, padding, dilation, dg):
    """Forward and input/offset/mask gradients written from detectron2's CUDA kernels
    (im2col + dmcn_im2col_bilinear, col2im + dmcn_get_gradient_weight, col2im_coord +
    dmcn_get_coordinate_weight), loop by loop in float64 numpy; groups=1."""
    x, offset, weight, grad_out = (t.double().numpy() for t in (x, offset, weight, grad_out))
    mask = (
        np.ones((offset.shape[0], offset.shape[1] // 2) + offset.shape[2:])
        if mask is None
        else mask.double().numpy()
    )
    n, c_in, height, width = x.shape
    c_out, _, kh, kw = weight.shape
    ho, wo = offset.shape[2:]
    k_taps = kh * kw
    out = np.zeros((n, c_out, ho, wo))
    grad_x, grad_offset, grad_mask = np.zeros_like(x), np.zeros_like(offset), np.zeros_like(mask)

    def value(plane, h, w, y, xx):
        return plane[y, xx] if 0 <= y < height and 0 <= xx < width else 0.0

    for b, c, i, j, oh, ow in np.ndindex(n, c_in, kh, kw, ho, wo):
        g, k = c // (c_in // dg), i * kw + j
        dy = offset[b, g * 2 * k_taps + 2 * k, oh, ow]
        dx = offset[b, g * 2 * k_taps + 2 * k + 1, oh, ow]
        m = mask[b, g * k_taps + k, oh, ow]
        h = oh * stride[0] - padding[0] + i * dilation[0] + dy
        w = ow * stride[1] - padding[1] + j * dilation[1] + dx
        if not (-1 < h < height and -1 < w < width):
            continue  # value 0, and every gradient 0
        plane = x[b, c]
        hl, wl = int(np.floor(h)), int(np.floor(w))
        lh, lw = h - hl, w - wl
        v = [value(plane, h, w, hl + a, wl + e) for a in (0, 1) for e in (0, 1)]
        val = (1 - lh) * (1 - lw) * v[0] + (1 - lh) * lw * v[1] + lh * (1 - lw) * v[2]
        val += lh * lw * v[3]
        out[b, :, oh, ow] += weight[:, c, i, j] * val * m
        top = float(weight[:, c, i, j] @ grad_out[b, :, oh, ow])  # column gradient
        for a, e, wt in (
            (0, 0, (1 - lh) * (1 - lw)),
            (0, 1, (1 - lh) * lw),
            (1, 0, lh * (1 - lw)),
            (1, 1, lh * lw),
        ):
            if 0 <= hl + a < height and 0 <= wl + e < width:
                grad_x[b, c, hl + a, wl + e] += wt * top * m
        coord_h = -(1 - lw) * v[0] - lw * v[1] + (1 - lw) * v[2] + lw * v[3]
        coord_w = -(1 - lh) * v[0] + (1 - lh) * v[1] - lh * v[2] + lh * v[3]
        grad_offset[b, g * 2 * k_taps + 2 * k, oh, ow] += coord_h * top * m
        grad_offset[b, g * 2 * k_taps + 2 * k + 1, oh, ow] += coord_w * top * m
        grad_mask[b, g * k_taps + k, oh, ow] += val * top
    return [torch.from_numpy(a) for a in (out, grad_x, grad_offset, grad_mask)]


def _floor_autograd(x, offset, mask, weight, stride, padding, dilation, dg):
    """The op written with torch.floor, gathers and validity masks, differentiated by autograd."""
    n, c_in, height, width = x.shape
    c_out, _, kh, kw = weight.shape
    ho, wo = offset.shape[2:]
    k_taps = kh * kw
    ii, jj = torch.meshgrid(torch.arange(kh), torch.arange(kw), indexing="ij")
    oh, ow = torch.meshgrid(torch.arange(ho), torch.arange(wo), indexing="ij")
    base_h = (oh * stride[0] - padding[0]).reshape(1, -1) + (ii * dilation[0]).reshape(-1, 1)
    base_w = (ow * stride[1] - padding[1]).reshape(1, -1) + (jj * dilation[1]).reshape(-1, 1)
    off = offset.view(n, dg, k_taps, 2, ho * wo)
    h, w = base_h + off[:, :, :, 0], base_w + off[:, :, :, 1]  # (n, dg, K, P)
    inside = ((h > -1) & (h < height) & (w > -1) & (w < width)).double()
    hl, wl = torch.floor(h), torch.floor(w)
    lh, lw = h - hl, w - wl
    planes = x.view(n, dg, c_in // dg, height * width)
    val = 0
    for a, e, wt in (
        (0, 0, (1 - lh) * (1 - lw)),
        (0, 1, (1 - lh) * lw),
        (1, 0, lh * (1 - lw)),
        (1, 1, lh * lw),
    ):
        y, xx = hl.long() + a, wl.long() + e
        ok = ((y >= 0) & (y < height) & (xx >= 0) & (xx < width)).double()
        idx = (y.clamp(0, height - 1) * width + xx.clamp(0, width - 1)).view(n, dg, 1, -1)
        v = planes.gather(3, idx.expand(-1, -1, c_in // dg, -1)).view(n, dg, -1, k_taps, ho * wo)
        val = val + v * (wt * ok * inside).unsqueeze(2)
    if mask is not None:
        val = val * mask.view(n, dg, 1, k_taps, ho * wo)
    cols = val.reshape(n, c_in * k_taps, ho * wo)
    return (weight.view(c_out, -1) @ cols).view(n, c_out, ho, wo)


def _border_case(dtype=torch.float64):
    """Offsets that put sampling points exactly on integers, -1, 0, H-1 and H."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 4, 5, generator=g, dtype=dtype)
    weight = torch.randn(2, 4, 2, 3, generator=g, dtype=dtype)
    choices = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0], dtype=dtype)
    offset = choices[torch.randint(0, 6, (2, 2 * 12, 5, 5), generator=g)]  # dg=2, K=6
    mask = torch.rand(2, 12, 5, 5, generator=g, dtype=dtype)
    grad_out = torch.randn(2, 2, 5, 5, generator=g, dtype=dtype)
    geometry = ((1, 1), (1, 1), (1, 1), 2)  # stride, padding, dilation, dg: Ho=5, Wo=5
    return x, offset, mask, weight, grad_out, geometry


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("modulated", [True, False])
def test_matches_detectron2_kernels_at_integer_and_border_points(impl, modulated):
    x, offset, mask, weight, grad_out, (s, p, d, dg) = _border_case()
    mask = mask if modulated else None
    expected = detectron2_reference(x, offset, mask, weight, grad_out, s, p, d, dg)
    tensors = [t.clone().requires_grad_() for t in (x, offset, mask) if t is not None]
    out = _native(
        *tensors[:2], tensors[2] if modulated else None, weight, None, s, p, d, 1, dg, impl=impl
    )
    grads = torch.autograd.grad(out, tensors, grad_out)
    torch.testing.assert_close(out, expected[0])
    for got, want in zip(grads, expected[1:]):
        torch.testing.assert_close(got, want)


def test_floor_formulation_under_autograd_is_detectron2s_gradient():
    """The claim behind native_torch: floor + gathers + validity masks, differentiated by
    autograd, give detectron2's gradients exactly, including at integer and border points."""
    x, offset, mask, weight, grad_out, (s, p, d, dg) = _border_case()
    expected = detectron2_reference(x, offset, mask, weight, grad_out, s, p, d, dg)
    tensors = [t.clone().requires_grad_() for t in (x, offset, mask)]
    out = _floor_autograd(*tensors, weight, s, p, d, dg)
    grads = torch.autograd.grad(out, tensors, grad_out)
    torch.testing.assert_close(out, expected[0])
    for got, want in zip(grads, expected[1:]):
        torch.testing.assert_close(got, want)


def _issue_example(backend):
    """The issue's example: rows [1, 2, 3], 2x2 ones kernel, padding 1, zero-initialised
    offset conv (8 offsets + 4 sigmoid mask channels = 0.5), loss = out.sum()."""
    x = torch.tensor([[1.0, 2.0, 3.0]] * 3).view(1, 1, 3, 3).requires_grad_()
    offset_conv = nn.Conv2d(1, 12, 2, padding=1)
    nn.init.zeros_(offset_conv.weight)
    nn.init.zeros_(offset_conv.bias)
    weight = torch.ones(1, 1, 2, 2, requires_grad=True)
    o = offset_conv(x)
    out = modulated_deform_conv(x, o[:, :8], o[:, 8:].sigmoid(), weight, padding=1, backend=backend)
    out.sum().backward()
    return out, x.grad, weight.grad, offset_conv.bias.grad


def test_issue_border_example_native():
    out, grad_x, grad_weight, grad_offset_bias = _issue_example("native")
    # Each output sums 0.5 * (valid rows) * (values of the valid columns) by hand.
    expected_out = [
        [0.5, 1.5, 2.5, 1.5],
        [1.0, 3.0, 5.0, 3.0],
        [1.0, 3.0, 5.0, 3.0],
        [0.5, 1.5, 2.5, 1.5],
    ]
    torch.testing.assert_close(out, torch.tensor(expected_out).view(1, 1, 4, 4))
    # Every pixel is sampled once by each of the 4 taps with mask 0.5.
    torch.testing.assert_close(grad_x, torch.full((1, 1, 3, 3), 2.0))
    # Each tap sees every pixel once: 0.5 * (1 + 2 + 3) * 3.
    torch.testing.assert_close(grad_weight, torch.full((1, 1, 2, 2), 9.0))
    # detectron2's and mmcv's kernels: one-sided slope at the last row/column (high corner 0).
    expected = [-3, -1.5, -3, -1.5, -3, -1.5, -3, -1.5, 4.5, 4.5, 4.5, 4.5]
    torch.testing.assert_close(grad_offset_bias, torch.tensor(expected))


def test_issue_border_example_torchvision_differs():
    """Why native exists: torchvision agrees on values, input and weight gradients, but its
    offset gradient at these integer border points is not detectron2's."""
    native_result = _issue_example("native")
    tv_result = _issue_example("torchvision")
    for a, b in zip(native_result[:3], tv_result[:3]):
        torch.testing.assert_close(a, b)
    expected_tv = [0, 0, 0, -1.5, -3, 0, -3, -1.5, 4.5, 4.5, 4.5, 4.5]
    torch.testing.assert_close(tv_result[3], torch.tensor(expected_tv))
    assert not torch.allclose(native_result[3], tv_result[3])


DETECTRON2_EXPECTED = [
    [30, 41.25, 48.75, 45, 28.75],
    [62.25, 81, 90, 80.25, 50.25],
    [99.75, 126, 135, 117.75, 72.75],
    [105, 131.25, 138.75, 120, 73.75],
    [71.75, 89.25, 93.75, 80.75, 49.5],
]


@pytest.mark.parametrize("impl", IMPLS)
def test_detectron2_forward_expectation(impl):
    """detectron2's tests/layers/test_deformable.py: arange(25), offsets 0.5, 3x3 ones, pad 1."""
    x = torch.arange(25, dtype=torch.float32).view(1, 1, 5, 5)
    offset = torch.full((1, 18, 5, 5), 0.5)
    weight = torch.ones(1, 1, 3, 3)
    expected = torch.tensor(DETECTRON2_EXPECTED).view(1, 1, 5, 5)
    torch.testing.assert_close(_native(x, offset, None, weight, padding=1, impl=impl), expected)
    mask = torch.full((1, 9, 5, 5), 0.5)
    out = _native(x, offset, mask, weight, padding=1, impl=impl)
    torch.testing.assert_close(out, expected * 0.5)


CONFIGS = [
    # size, kernel, stride, padding, dilation, groups, dg
    ((7, 9), (3, 3), (1, 1), (1, 1), (1, 1), 1, 1),
    ((8, 6), (2, 3), (2, 1), (0, 2), (2, 1), 2, 2),
    ((5, 5), (1, 1), (1, 2), (0, 0), (1, 1), 1, 4),
]


@pytest.mark.skipif("cpp" not in IMPLS, reason="compiled kernels did not build")
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [None, 37])
def test_compiled_and_pytorch_kernels_agree(config, dtype, chunk, monkeypatch):
    size, kernel, s, p, d, groups, dg = config
    if chunk is not None:  # columns split into many position ranges, across image boundaries
        monkeypatch.setattr(native, "_CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(1)
    ho = (size[0] + 2 * p[0] - d[0] * (kernel[0] - 1) - 1) // s[0] + 1
    wo = (size[1] + 2 * p[1] - d[1] * (kernel[1] - 1) - 1) // s[1] + 1
    k = kernel[0] * kernel[1]
    tensors = [
        torch.randn(3, 4, *size, generator=g, dtype=dtype),
        (torch.rand(3, 2 * dg * k, ho, wo, generator=g, dtype=dtype) - 0.5) * 8,
        torch.rand(3, dg * k, ho, wo, generator=g, dtype=dtype),
        torch.randn(6, 4 // groups, *kernel, generator=g, dtype=dtype),
        torch.randn(6, generator=g, dtype=dtype),
    ]
    upstream = torch.randn(3, 6, ho, wo, generator=g, dtype=dtype)
    results = []
    for impl in ("torch", "cpp"):
        leaves = [t.clone().requires_grad_() for t in tensors]
        out = _native(*leaves, s, p, d, groups, dg, impl=impl)
        results.append([out, *torch.autograd.grad(out, leaves, upstream)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif("cpp" not in IMPLS, reason="compiled kernels did not build")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_compiled_input_gradient_split_across_groups(threads):
    """The compiled input gradient runs in blocks of channels (one per thread, whole vectors of
    16): with 48 channels, blocks [0, 32), [32, 48) for 2 threads and [0, 16), [16, 32),
    [32, 48) for 3 cut through the deformable and convolution groups of 24 channels. Every
    gradient matches the PyTorch kernels."""
    g = torch.Generator().manual_seed(3)
    c, dg, groups = 48, 2, 2
    x = torch.randn(1, c, 6, 7, generator=g, dtype=torch.float64)
    offset = (torch.rand(1, 2 * dg * 9, 6, 7, generator=g, dtype=torch.float64) - 0.5) * 6
    mask = torch.rand(1, dg * 9, 6, 7, generator=g, dtype=torch.float64)
    weight = torch.randn(8, c // groups, 3, 3, generator=g, dtype=torch.float64)
    upstream = torch.randn(1, 8, 6, 7, generator=g, dtype=torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for impl in ("torch", "cpp"):
            leaves = [t.clone().requires_grad_() for t in (x, offset, mask, weight)]
            out = _native(*leaves, None, 1, 1, 1, groups, dg, impl=impl)
            results.append([out, *torch.autograd.grad(out, leaves, upstream)])
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_kernels_handle_position_ranges(impl):
    kernels = native_cpp if impl == "cpp" else native_torch
    x = torch.randn(2, 4, 4, 5, dtype=torch.float64)
    xp = native._pad_channels_last(x)
    offset = torch.randn(2, 36, 4, 5, dtype=torch.float64)
    mask = torch.rand(2, 18, 4, 5, dtype=torch.float64)
    geometry = ((3, 3), (1, 1), (1, 1), (1, 1), 2, 2)
    full = kernels.im2col(xp, offset, mask, *geometry, 0, 20)
    part = kernels.im2col(xp, offset, mask, *geometry, 5, 11)
    torch.testing.assert_close(part, full[:, 5:11])
    grad_cols = torch.randn(2, 20, 36, dtype=torch.float64)
    offset_full, mask_full, cols_full = kernels.backward(
        xp, offset, mask, grad_cols, *geometry, 0, 20, None, True, True
    )
    offset_part, mask_part, cols_part = kernels.backward(
        xp, offset, mask, grad_cols[:, 5:11].contiguous(), *geometry, 5, 11, None, True, True
    )
    torch.testing.assert_close(offset_part, offset_full[:, :, 5:11])
    torch.testing.assert_close(mask_part, mask_full[:, :, 5:11])
    torch.testing.assert_close(cols_part, cols_full[:, 5:11])


def test_impl_validation():
    x, offset, weight = torch.randn(1, 1, 3, 3), torch.zeros(1, 18, 3, 3), torch.ones(1, 1, 3, 3)
    with pytest.raises(ValueError, match="Unknown native implementation 'fast'"):
        _native(x, offset, None, weight, padding=1, impl="fast")
    with pytest.raises(ValueError, match="CPU float32/float64"):
        _native(x.bfloat16(), offset.bfloat16(), None, weight.bfloat16(), padding=1, impl="cpp")
    # Other dtypes (no autocast) go to the PyTorch kernels.
    out = _native(x.bfloat16(), offset.bfloat16(), None, weight.bfloat16(), padding=1)
    assert out.dtype == torch.bfloat16


def test_build_failure_falls_back_with_one_warning(monkeypatch, caplog, unbuildable_extension):
    unbuildable_extension(native_cpp)
    x, offset, weight = (
        torch.randn(1, 1, 5, 5),
        torch.full((1, 18, 5, 5), 0.5),
        torch.ones(1, 1, 3, 3),
    )
    with caplog.at_level(logging.WARNING, logger="dcnv2.layers.native_cpp"):
        for _ in range(3):
            out = _native(x, offset, None, weight, padding=1)
    warnings = [r for r in caplog.records if "could not build" in r.getMessage()]
    assert len(warnings) == 1 and "no compiler" in warnings[0].getMessage()
    torch.testing.assert_close(out, _native(x, offset, None, weight, padding=1, impl="torch"))
    with pytest.raises(RuntimeError, match="failed to build: RuntimeError: no compiler"):
        _native(x, offset, None, weight, padding=1, impl="cpp")


def test_environment_variable_selects_pytorch_kernels():
    # The environment is read once (at import) into what "auto" stands for.
    chosen = backends.native_impl_from_environment({"DCNV2_NATIVE_IMPL": "torch"})
    assert native._kernels(torch.zeros(1), chosen) is native_torch
    chosen = backends.native_impl_from_environment({})
    expected = native_cpp if "cpp" in IMPLS else native_torch
    assert native._kernels(torch.zeros(1), chosen) is expected
    with pytest.raises(ValueError, match="DCNV2_NATIVE_IMPL must be"):
        backends.native_impl_from_environment({"DCNV2_NATIVE_IMPL": "fast"})


def test_environment_choice_torch_never_starts_a_build(monkeypatch):
    # DCNV2_NATIVE_IMPL=torch: convolutions (float32, where the packed gemm would apply) and
    # mdpool, forward and backward, run without building either extension.
    monkeypatch.setattr(backends, "_NATIVE_IMPL_DEFAULT", "torch")
    builds = []
    monkeypatch.setattr(JitExtension, "_build", lambda self: builds.append(self.name) or "no")
    for module in (native_cpp, mdpool_cpp):
        real = module._EXTENSION
        fresh = JitExtension(
            real.name, real.sources, real.probe, real.what, real.fallback, real.logger
        )
        monkeypatch.setattr(module, "_EXTENSION", fresh)
    native_cpp.gemm_supported.cache_clear()
    try:
        x = torch.randn(2, 8, 9, 11, requires_grad=True)
        for layer in (
            DeformConv(8, 8, 3, padding=1, bias=False),
            ModulatedDeformConv(8, 8, 3, padding=1, groups=2),
        ):
            n_offset = 18 if isinstance(layer, DeformConv) else 27
            offset = torch.randn(2, n_offset, 9, 11)
            if isinstance(layer, DeformConv):
                out = layer(x, offset)
            else:
                out = layer(x, offset[:, :18], offset[:, 18:].sigmoid())
            out.sum().backward()
        pool = ModulatedDeformRoIAlign(output_size=3, in_channels=8, fc_dim=16)
        rois = torch.tensor([[0, 1.0, 1.0, 8.0, 6.0], [1, 0.0, 2.0, 5.0, 9.0]])
        pool(x, rois).sum().backward()
        assert builds == []
    finally:
        native_cpp.gemm_supported.cache_clear()


@CUDA
def test_native_on_cuda_matches_cpu():
    x, offset, mask, weight, grad_out, (s, p, d, dg) = _border_case(torch.float32)
    results = []
    for device in ("cpu", "cuda"):
        leaves = [t.to(device).requires_grad_() for t in (x, offset, mask, weight)]
        out = _native(*leaves, None, s, p, d, 1, dg)
        grads = torch.autograd.grad(out, leaves, grad_out.to(device))
        results.append([t.cpu() for t in (out, *grads)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(
    not torch.cuda.is_available() or "detectron2" not in available_backends("cuda"),
    reason="needs CUDA and detectron2's compiled CUDA ops",
)
def test_native_matches_detectron2_backend_on_cuda():
    x, offset, mask, weight, grad_out, (s, p, d, dg) = _border_case(torch.float32)
    results = []
    for backend in ("native", "detectron2"):
        leaves = [t.cuda().requires_grad_() for t in (x, offset, mask, weight)]
        out = modulated_deform_conv(*leaves, None, s, p, d, 1, dg, backend=backend)
        grads = torch.autograd.grad(out, leaves, grad_out.cuda())
        results.append([t.cpu() for t in (out, *grads)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_products_both_ways_round(groups, dtype):
    """Weight-first and columns-first products of a chunk write w[g] @ cols[b, :, g].T into a
    strided slice of the output, as a float64 einsum does, and leave the rest untouched."""
    g = torch.Generator().manual_seed(5)
    n, pc, cog, kc = 2, 11, 4, 6
    w = torch.randn(groups, cog, kc, generator=g, dtype=dtype)
    cols = torch.randn(n, pc, groups, kc, generator=g, dtype=dtype)
    expected = torch.einsum("gok,npgk->ngop", w.double(), cols.double()).reshape(n, -1, pc)
    for product in (native._weight_first, native._columns_first):
        full = torch.full((n, groups * cog, pc + 5), 7.0, dtype=dtype)
        product(w, cols, full[:, :, 2 : 2 + pc])
        torch.testing.assert_close(full[:, :, 2 : 2 + pc], expected.to(dtype))
        assert (full[:, :, :2] == 7).all() and (full[:, :, 2 + pc :] == 7).all()


@pytest.mark.parametrize("way", ["weight_first", "columns_first"])
def test_forward_product_choice(way, monkeypatch):
    """A new weight shape is measured once and the choice cached for any number of positions;
    either way gives detectron2's result (the float64 loop reference)."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    offset = torch.randn(2, 18, 5, 6, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(2, 9, 5, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    monkeypatch.setattr(native, "_FASTEST", {})
    _native(x, offset, mask, weight, padding=1)
    assert native._FASTEST == {}  # too small to measure
    monkeypatch.setattr(native, "_MEASURE_MACS", 0)
    out = _native(x, offset, mask, weight, padding=1)
    key = ("forward", (1, 4, 27), torch.float64, torch.get_num_threads())
    assert list(native._FASTEST) == [key]
    native._FASTEST[key] = way
    forced = _native(x, offset, mask, weight, padding=1)
    fewer = _native(x[:, :, :4], offset[:, :, :4], mask[:, :, :4], weight, padding=1)
    assert list(native._FASTEST) == [key] and native._FASTEST[key] == way
    grad = torch.zeros(2, 4, 5, 6, dtype=torch.float64)
    expected = detectron2_reference(x, offset, mask, weight, grad, (1, 1), (1, 1), (1, 1), 1)[0]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(forced, expected)
    args = (x[:, :, :4], offset[:, :, :4], mask[:, :, :4], weight, grad[:, :, :4])
    torch.testing.assert_close(fewer, detectron2_reference(*args, (1, 1), (1, 1), (1, 1), 1)[0])
