"""Backend-agnostic behaviour of the public deformable-conv API, for every CPU backend."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from dcnv2.layers import (
    DeformConv,
    ModulatedDeformConv,
    available_backends,
    deform_conv,
    modulated_deform_conv,
)

BACKENDS = available_backends("cpu")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _inputs(n, c_in, c_out, size, kernel, groups, dg, out_size, dtype=torch.float64, seed=0):
    """Random input, weight and bias, and offsets whose sampling points are never integers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, *size, generator=g, dtype=dtype)
    weight = torch.randn(c_out, c_in // groups, *kernel, generator=g, dtype=dtype)
    bias = torch.randn(c_out, generator=g, dtype=dtype)
    k = kernel[0] * kernel[1]
    shape = (n, 2 * dg * k, *out_size)
    # Integer part in [-2, 1], fractional part in [0.1, 0.9]: away from torchvision's differing
    # gradient at integer coordinates.
    whole = torch.randint(-2, 2, shape, generator=g).to(dtype)
    offset = whole + 0.1 + 0.8 * torch.rand(shape, generator=g, dtype=dtype)
    mask = torch.rand(n, dg * k, *out_size, generator=g, dtype=dtype)
    return x, offset, mask, weight, bias


def _grads(out, tensors, seed=1):
    g = torch.Generator().manual_seed(seed)
    upstream = torch.randn(out.shape, generator=g, dtype=out.dtype)  # the same on every device
    return torch.autograd.grad(out, tensors, upstream.to(out.device))


CONFIGS = [
    # stride, padding, dilation, groups, deformable_groups
    ((1, 1), (0, 0), (1, 1), 1, 1),
    ((2, 1), (1, 2), (1, 2), 2, 1),
    ((1, 2), (2, 1), (2, 1), 1, 2),
    ((2, 2), (1, 1), (2, 2), 2, 2),
]


def _out_size(size, kernel, stride, padding, dilation):
    return tuple(
        (size[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
        for i in range(2)
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("modulated,with_bias", [(True, True), (True, False), (False, False)])
def test_zero_offsets_unit_mask_equal_conv2d(backend, config, modulated, with_bias):
    stride, padding, dilation, groups, dg = config
    size, kernel = (7, 6), (3, 2)
    out_size = _out_size(size, kernel, stride, padding, dilation)
    x, offset, mask, weight, bias = _inputs(2, 4, 4, size, kernel, groups, dg, out_size)
    offset.zero_()
    mask = mask.fill_(1) if modulated else None
    bias = bias if with_bias else None
    out = modulated_deform_conv(
        x, offset, mask, weight, bias, stride, padding, dilation, groups, dg, backend=backend
    )
    expected = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("pair", list(itertools.combinations(BACKENDS, 2)))
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("modulated", [True, False])
def test_backends_agree_forward_and_gradients(pair, config, modulated):
    stride, padding, dilation, groups, dg = config
    size, kernel = (8, 7), (3, 3)
    out_size = _out_size(size, kernel, stride, padding, dilation)
    tensors = _inputs(2, 4, 6, size, kernel, groups, dg, out_size, seed=3)
    results = []
    for backend in pair:
        x, offset, mask, weight, bias = (t.clone().requires_grad_() for t in tensors)
        mask = mask if modulated else None
        out = modulated_deform_conv(
            x, offset, mask, weight, bias, stride, padding, dilation, groups, dg, backend=backend
        )
        inputs = [t for t in (x, offset, mask, weight, bias) if t is not None]
        results.append((out, *_grads(out, inputs)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("modulated", [True, False])
def test_gradcheck(backend, modulated):
    stride, padding, dilation, groups, dg = (2, 2), (1, 1), (2, 2), 2, 2
    size, kernel = (7, 6), (2, 2)
    out_size = _out_size(size, kernel, stride, padding, dilation)
    tensors = _inputs(1, 4, 2, size, kernel, groups, dg, out_size, seed=5)
    x, offset, mask, weight, bias = (t.requires_grad_() for t in tensors)

    def fn(x, offset, mask, weight, bias):
        return modulated_deform_conv(
            x, offset, mask, weight, bias, stride, padding, dilation, groups, dg, backend=backend
        )

    # Finite-difference steps of 1e-6 never move a sampling point across an integer here.
    assert torch.autograd.gradcheck(
        fn, (x, offset, mask if modulated else None, weight, bias), eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    offset = torch.randn(0, 18, 5, 5, requires_grad=True)
    mask = torch.rand(0, 9, 5, 5, requires_grad=True)
    weight = torch.randn(6, 4, 3, 3, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    out = modulated_deform_conv(x, offset, mask, weight, bias, padding=1, backend=backend)
    assert out.shape == (0, 6, 5, 5)
    out.sum().backward()
    for t in (x, offset, mask, weight, bias):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


def _call(x_shape=(2, 4, 6, 6), off_c=18, mask_c=9, w_shape=(4, 4, 3, 3), groups=1, dg=1, **kw):
    n, _, h, w = x_shape
    ho, wo = kw.pop("out", (h, w))
    x = torch.randn(*x_shape)
    offset = torch.randn(kw.pop("off_n", n), off_c, ho, wo)
    mask = torch.rand(n, mask_c, ho, wo)
    weight = torch.randn(*w_shape)
    return modulated_deform_conv(
        x, offset, mask, weight, None, padding=kw.pop("padding", 1), groups=groups,
        deformable_groups=dg, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(off_c=9), r"offset has shape \(2, 9, 6, 6\), expected \(2, 18, 6, 6\)"),
        (dict(mask_c=18), r"mask has shape \(2, 18, 6, 6\), expected \(2, 9, 6, 6\)"),
        (dict(off_c=36, mask_c=18, dg=3), r"divisible by deformable_groups \(3\)"),
        (dict(w_shape=(3, 2, 3, 3), groups=2), r"divisible by groups \(2\)"),
        (dict(w_shape=(4, 4, 3, 3), groups=2), r"expected \(C_out, 2, kh, kw\)"),
        (dict(off_n=1), r"offset has shape \(1, 18, 6, 6\), expected \(2, 18, 6, 6\)"),
        (dict(out=(5, 6)), r"offset has shape \(2, 18, 5, 6\), expected \(2, 18, 6, 6\)"),
        (dict(x_shape=(2, 4, 2, 2), padding=0, out=(1, 1)), r"too small"),
    ],
)
def test_bad_shapes_raise_value_error(backend, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _call(backend=backend, **kwargs)


def test_unknown_or_unavailable_backend():
    with pytest.raises(ValueError, match="Unknown deformable-conv backend 'cudnn'"):
        _call(backend="cudnn")
    if "detectron2" not in available_backends("cpu"):
        with pytest.raises(ValueError, match="'detectron2' is not available for cpu tensors"):
            _call(backend="detectron2")


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bfloat16_matches_float32(backend):
    size, kernel = (9, 8), (3, 3)
    tensors = _inputs(2, 8, 8, size, kernel, 1, 1, size, dtype=torch.float32, seed=7)
    x, offset, mask, weight, bias = tensors
    expected = modulated_deform_conv(x, offset, mask, weight, bias, padding=1, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = modulated_deform_conv(
            x.bfloat16(), offset, mask, weight, bias, padding=1, backend=backend
        )
    assert out.dtype == torch.float32
    # bfloat16 rounds the input (8 bits of mantissa); the op itself runs in float32.
    err = (out - expected).norm() / expected.norm()
    assert err < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    size, kernel = (7, 7), (3, 3)
    x, offset, mask, weight, bias = _inputs(2, 4, 4, size, kernel, 1, 1, size, seed=9)
    expected = modulated_deform_conv(x, offset, mask, weight, bias, padding=1, backend=backend)
    # Channels-last and transposed storage: same values, other strides.
    out = modulated_deform_conv(
        x.contiguous(memory_format=torch.channels_last),
        offset.transpose(2, 3).contiguous().transpose(2, 3),
        mask.contiguous(memory_format=torch.channels_last),
        weight.transpose(0, 1).contiguous().transpose(0, 1),
        bias,
        padding=1,
        backend=backend,
    )
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_preserved(backend, dtype):
    x, offset, mask, weight, bias = _inputs(1, 2, 3, (5, 5), (3, 3), 1, 1, (5, 5), dtype=dtype)
    out = modulated_deform_conv(x, offset, mask, weight, bias, padding=1, backend=backend)
    assert out.dtype == dtype
    out32 = deform_conv(x.float(), offset.float(), weight.float(), padding=1, backend=backend)
    out64 = deform_conv(x.double(), offset.double(), weight.double(), padding=1, backend=backend)
    torch.testing.assert_close(out32.double(), out64, rtol=1e-5, atol=1e-5)


def test_module_constructor_validation():
    with pytest.raises(ValueError, match="divisible by groups"):
        ModulatedDeformConv(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="divisible by deformable_groups"):
        DeformConv(4, 4, 3, deformable_groups=3)
    with pytest.raises(ValueError, match="kernel_size must be"):
        DeformConv(4, 4, 0)


def test_module_extra_repr():
    module = DeformConv(3, 10, kernel_size=3, padding=1, deformable_groups=1, backend="native")
    assert repr(module) == (
        "DeformConv(in_channels=3, out_channels=10, kernel_size=(3, 3), stride=(1, 1), "
        "padding=(1, 1), dilation=(1, 1), groups=1, deformable_groups=1, bias=False, "
        "backend='native')"
    )
    assert ModulatedDeformConv(4, 4, 3, deformable_groups=2).offset_channels == 36


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_backend_passthrough(backend, monkeypatch):
    from dcnv2.layers import backends

    seen = []
    original = backends.BACKENDS[backend]
    monkeypatch.setitem(
        backends.BACKENDS, backend, lambda *args: seen.append(backend) or original(*args)
    )
    x = torch.randn(1, 4, 6, 6)
    module = ModulatedDeformConv(4, 4, 3, padding=1, backend=backend)
    out = module(x, torch.zeros(1, 18, 6, 6), torch.ones(1, 9, 6, 6))
    torch.testing.assert_close(out, F.conv2d(x, module.weight, module.bias, padding=1))
    dcn1 = DeformConv(4, 4, 3, padding=1, backend=backend)
    dcn1(x, torch.zeros(1, 18, 6, 6))
    assert seen == [backend, backend]


@CUDA
@pytest.mark.parametrize("modulated", [True, False])
def test_cuda_backends_agree(modulated):
    names = available_backends("cuda")
    size, kernel = (9, 8), (3, 3)
    tensors = _inputs(2, 4, 4, size, kernel, 1, 1, size, dtype=torch.float32, seed=11)
    results = []
    for backend in names:
        x, offset, mask, weight, bias = (t.cuda().requires_grad_() for t in tensors)
        mask = mask if modulated else None
        out = modulated_deform_conv(x, offset, mask, weight, bias, padding=1, backend=backend)
        inputs = [t for t in (x, offset, mask, weight, bias) if t is not None]
        results.append([t.cpu() for t in (out, *_grads(out, inputs))])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
