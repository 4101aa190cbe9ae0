"""Property-based checks of the deformable-conv op over shapes, strides, paddings, dilations,
groups, deformable groups and dtypes: every call returns the reference result, or raises a
ValueError/TypeError that says what is wrong; never a crash, a wrong shape or NaN.

The reference is written here from the semantics of detectron2's CUDA kernel
(``modulated_deformable_im2col_gpu_kernel`` + ``dmcn_im2col_bilinear``), in float64 numpy,
independently of every backend.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcnv2.layers import available_backends, modulated_deform_conv

BACKENDS = available_backends("cpu")


def _bilinear(img, h, w):
    """detectron2's dmcn_im2col_bilinear for arrays of points; 0 outside (-1, H) x (-1, W)."""
    height, width = img.shape
    inside = (h > -1) & (w > -1) & (h < height) & (w < width)
    h_low, w_low = np.floor(h).astype(int), np.floor(w).astype(int)
    lh, lw = h - h_low, w - w_low
    val = np.zeros_like(h)
    for dy, dx, wt in (
        (0, 0, (1 - lh) * (1 - lw)),
        (0, 1, (1 - lh) * lw),
        (1, 0, lh * (1 - lw)),
        (1, 1, lh * lw),
    ):
        y, x = h_low + dy, w_low + dx
        ok = inside & (y >= 0) & (y < height) & (x >= 0) & (x < width)
        val += np.where(ok, wt * img[np.clip(y, 0, height - 1), np.clip(x, 0, width - 1)], 0.0)
    return val


def reference(x, offset, mask, weight, bias, stride, padding, dilation, groups, dg):
    x, offset, weight = (t.double().numpy() for t in (x, offset, weight))
    mask = None if mask is None else mask.double().numpy()
    n, c_in, _, _ = x.shape
    c_out, _, kh, kw = weight.shape
    ho, wo = offset.shape[2:]
    oh, ow = np.meshgrid(np.arange(ho), np.arange(wo), indexing="ij")
    cols = np.zeros((n, c_in, kh * kw, ho, wo))
    for b in range(n):
        for c in range(c_in):
            g = c // (c_in // dg)
            for i in range(kh):
                for j in range(kw):
                    k = i * kw + j
                    dy = offset[b, g * 2 * kh * kw + 2 * k]
                    dx = offset[b, g * 2 * kh * kw + 2 * k + 1]
                    h = oh * stride[0] - padding[0] + i * dilation[0] + dy
                    w = ow * stride[1] - padding[1] + j * dilation[1] + dx
                    v = _bilinear(x[b, c], h, w)
                    cols[b, c, k] = v if mask is None else v * mask[b, g * kh * kw + k]
    out = np.zeros((n, c_out, ho, wo))
    cin_g, cout_g = c_in // groups, c_out // groups
    for o in range(c_out):
        grp = o // cout_g
        w_o = weight[o].reshape(cin_g, kh * kw)
        out[:, o] = np.einsum("ck,nckhw->nhw", w_o, cols[:, grp * cin_g : (grp + 1) * cin_g])
    if bias is not None:
        out += bias.double().numpy()[None, :, None, None]
    return torch.from_numpy(out)


@st.composite
def op_cases(draw):
    groups = draw(st.integers(1, 2))
    dg = draw(st.integers(1, 2))
    c_in = groups * dg * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    return dict(
        n=draw(st.integers(0, 2)),
        c_in=c_in,
        c_out=c_out,
        kernel=(kh, kw),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        dg=dg,
        size=(h, w),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        modulated=draw(st.booleans()),
        bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        backend=draw(st.sampled_from(BACKENDS)),
    )


def _make(case, ho, wo):
    g = torch.Generator().manual_seed(case["seed"])
    dt = case["dtype"]
    kh, kw = case["kernel"]
    n, dg = case["n"], case["dg"]
    x = torch.randn(n, case["c_in"], *case["size"], generator=g, dtype=dt)
    weight = torch.randn(
        case["c_out"], case["c_in"] // case["groups"], kh, kw, generator=g, dtype=dt
    )
    offset = (torch.rand(n, 2 * dg * kh * kw, ho, wo, generator=g, dtype=dt) - 0.5) * 6
    mask = torch.rand(n, dg * kh * kw, ho, wo, generator=g, dtype=dt) if case["modulated"] else None
    bias = torch.randn(case["c_out"], generator=g, dtype=dt) if case["bias"] else None
    return x, offset, mask, weight, bias


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=op_cases())
def test_valid_calls_match_reference_or_raise_clear_error(case):
    (h, w), (kh, kw) = case["size"], case["kernel"]
    s, p, d = case["stride"], case["padding"], case["dilation"]
    ho = (h + 2 * p[0] - d[0] * (kh - 1) - 1) // s[0] + 1
    wo = (w + 2 * p[1] - d[1] * (kw - 1) - 1) // s[1] + 1
    args = (s, p, d, case["groups"], case["dg"])
    if ho < 1 or wo < 1:
        x, offset, mask, weight, bias = _make(case, 1, 1)
        with pytest.raises(ValueError, match="too small"):
            modulated_deform_conv(x, offset, mask, weight, bias, *args, backend=case["backend"])
        return
    x, offset, mask, weight, bias = _make(case, ho, wo)
    out = modulated_deform_conv(x, offset, mask, weight, bias, *args, backend=case["backend"])
    assert out.shape == (case["n"], case["c_out"], ho, wo)
    assert out.dtype == case["dtype"]
    assert torch.isfinite(out).all()
    expected = reference(x, offset, mask, weight, bias, *args)
    tol = 1e-4 if case["dtype"] == torch.float32 else 1e-10
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


@settings(max_examples=40, deadline=None)
@given(
    case=op_cases(),
    which=st.sampled_from(["offset_c", "mask_c", "offset_hw", "batch", "weight_c", "bias"]),
    delta=st.sampled_from([-1, 1, 2]),
)
def test_mismatched_shapes_raise_value_error_naming_the_expected_shape(case, which, delta):
    case = dict(case, n=max(case["n"], 1), modulated=True, bias=True, padding=(1, 1))
    (h, w), (kh, kw) = case["size"], case["kernel"]
    s, p, d = case["stride"], case["padding"], case["dilation"]
    ho = (h + 2 * p[0] - d[0] * (kh - 1) - 1) // s[0] + 1
    wo = (w + 2 * p[1] - d[1] * (kw - 1) - 1) // s[1] + 1
    if ho < 1 or wo < 1:
        return
    x, offset, mask, weight, bias = _make(case, ho, wo)

    def resize(t, dim):
        shape = list(t.shape)
        shape[dim] = max(shape[dim] + delta, 0)
        if shape[dim] == t.shape[dim]:
            shape[dim] += 1
        return torch.zeros(shape, dtype=t.dtype)

    if which == "offset_c":
        offset = resize(offset, 1)
    elif which == "mask_c":
        mask = resize(mask, 1)
    elif which == "offset_hw":
        offset = resize(offset, 3)
    elif which == "batch":
        mask = resize(mask, 0)
    elif which == "weight_c":
        weight = resize(weight, 1)
    else:
        bias = resize(bias, 0)
    with pytest.raises(ValueError, match=r"expected|divisible"):
        modulated_deform_conv(
            x,
            offset,
            mask,
            weight,
            bias,
            s,
            p,
            d,
            case["groups"],
            case["dg"],
            backend=case["backend"],
        )


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(stride=0), ValueError, "stride"),
        (dict(padding=-1), ValueError, "padding"),
        (dict(dilation=(1, 0)), ValueError, "dilation"),
        (dict(groups=0), ValueError, "groups"),
        (dict(deformable_groups=3), ValueError, "deformable_groups"),
        (dict(backend="cudnn"), ValueError, "Unknown deformable-conv backend"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    x = torch.randn(1, 4, 5, 5)
    offset, mask = torch.zeros(1, 18, 5, 5), torch.ones(1, 9, 5, 5)
    weight = torch.randn(4, 4, 3, 3)
    kwargs = dict(dict(padding=1), **kwargs)
    with pytest.raises(error, match=message):
        modulated_deform_conv(x, offset, mask, weight, **kwargs)


def test_integer_input_is_a_type_error():
    with pytest.raises(TypeError, match="floating-point"):
        modulated_deform_conv(
            torch.ones(1, 1, 3, 3, dtype=torch.int64),
            torch.zeros(1, 2, 3, 3),
            None,
            torch.ones(1, 1, 1, 1),
        )
