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

from dcnv2.layers import DeformConv, ModulatedDeformConv, available_backends, modulated_deform_conv

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


# --- Any call, valid or not: the reference result, or a ValueError/TypeError naming the problem.

_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# Tolerance of each compute dtype against the float64 reference, relative to the output's scale.
_TOL = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float32: 1e-4, torch.float64: 1e-10}


def _floating(*dtypes):
    out = None
    for dt in dtypes:
        if dt is not None and dt.is_floating_point:
            out = dt if out is None else torch.promote_types(out, dt)
    return out


_FAULTS = {
    "stride 0": dict(stride=0),
    "negative stride": dict(stride=(1, -1)),
    "float stride": dict(stride=1.5),
    "negative padding": dict(padding=-1),
    "3 paddings": dict(padding=(1, 1, 1)),
    "dilation 0": dict(dilation=(0, 1)),
    "groups 0": dict(groups=0),
    "float groups": dict(groups=1.0),
    "groups not dividing": dict(groups=3, c_in=4, c_out=4, dg=1),
    "deformable groups 0": dict(dg=0),
    "deformable groups not dividing": dict(dg=3, c_in=4, groups=1),
    "weight channels": dict(weight_in_delta=1),
    "offset channels": dict(offset_delta=1),
    "integer weight": dict(other="weight", other_dtype=torch.int64),
}


@st.composite
def any_calls(draw):
    """Arguments of modulated_deform_conv: a valid call (which may still be "too small"), in any
    dtype and mix of dtypes, with offsets up to far outside the image; or with one fault."""
    c = dict(
        draw(op_cases()),
        dtype=draw(st.sampled_from(_DTYPES)),
        # Another dtype for offset/mask/weight (mixed precision), or an integer offset.
        other_dtype=draw(st.sampled_from([None, None, torch.float32, torch.float64, torch.int64])),
        other=draw(st.sampled_from(["offset", "mask", "weight"])),
        weight_in_delta=0,
        offset_delta=0,
        # From a fraction of a pixel to far outside the image (finite in every dtype).
        offset_scale=draw(st.sampled_from([0.5, 3.0, 1e3, 6e4])),
    )
    if c["other"] == "weight" and c["other_dtype"] == torch.int64:
        c["other"] = "offset"
    fault = draw(st.sampled_from([None] * len(_FAULTS) + sorted(_FAULTS)))
    return dict(c, **_FAULTS.get(fault, {}))


def _pair_ok(v, minimum):
    pair = v if isinstance(v, tuple) else (v, v)
    return len(pair) == 2 and all(isinstance(p, int) and p >= minimum for p in pair), pair


def _expected_problems(c):
    """Names the error message may give ([] when the call is valid), and (Ho, Wo) or None."""
    problems = []
    s_ok, s = _pair_ok(c["stride"], 1)
    p_ok, p = _pair_ok(c["padding"], 0)
    d_ok, d = _pair_ok(c["dilation"], 1)
    for ok, name in ((s_ok, "stride"), (p_ok, "padding"), (d_ok, "dilation")):
        if not ok:
            problems.append(name)
    g, dg = c["groups"], c["dg"]
    if not (isinstance(g, int) and g >= 1):
        problems.append("groups")
    if not (isinstance(dg, int) and dg >= 1):
        problems.append("deformable_groups")
    if problems:
        return problems, None
    if c["other"] == "weight" and c["other_dtype"] == torch.int64:
        problems.append("weight")  # offsets may be integers, weights may not
    if c["c_in"] % g or c["c_out"] % g:
        problems.append("groups")
    if c["c_in"] % dg:
        problems.append("deformable_groups")
    if c["weight_in_delta"]:
        problems.append("weight")
    (h, w), (kh, kw) = c["size"], c["kernel"]
    ho = (h + 2 * p[0] - d[0] * (kh - 1) - 1) // s[0] + 1
    wo = (w + 2 * p[1] - d[1] * (kw - 1) - 1) // s[1] + 1
    if ho < 1 or wo < 1:
        problems.append("too small")
    elif c["offset_delta"]:
        problems.append("offset")
    return problems, (ho, wo)


def _build(c, out_hw):
    g = torch.Generator().manual_seed(c["seed"])
    kh, kw = c["kernel"]
    groups = c["groups"] if isinstance(c["groups"], int) and c["groups"] >= 1 else 1
    dg = c["dg"] if isinstance(c["dg"], int) and c["dg"] >= 1 else 1
    ho, wo = (max(v, 1) for v in out_hw or (1, 1))

    def rand(*shape, scale=1.0, positive=False):
        t = torch.rand(*shape, generator=g, dtype=torch.float64)
        return (t if positive else (t - 0.5) * 2) * scale

    x = rand(c["n"], c["c_in"], *c["size"])
    weight = rand(c["c_out"], max(c["c_in"] // groups, 1) + c["weight_in_delta"], kh, kw)
    offset = rand(c["n"], 2 * dg * kh * kw + c["offset_delta"], ho, wo, scale=c["offset_scale"])
    mask = rand(c["n"], dg * kh * kw, ho, wo, positive=True) if c["modulated"] else None
    bias = rand(c["c_out"]) if c["bias"] else None
    dtypes = {k: c["dtype"] for k in ("x", "offset", "mask", "weight", "bias")}
    if c["other_dtype"] is not None:
        dtypes[c["other"]] = c["other_dtype"]
    if dtypes["offset"] == torch.int64:
        offset = offset.round()
    tensors = dict(x=x, offset=offset, mask=mask, weight=weight, bias=bias)
    return {k: (None if t is None else t.to(dtypes[k])) for k, t in tensors.items()}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=any_calls())
def test_any_call_returns_the_reference_or_raises_a_clear_error(c):
    problems, out_hw = _expected_problems(c)
    t = _build(c, out_hw)
    args = (t["x"], t["offset"], t["mask"], t["weight"], t["bias"], c["stride"], c["padding"])
    kwargs = dict(dilation=c["dilation"], groups=c["groups"], deformable_groups=c["dg"])
    if problems:
        with pytest.raises((ValueError, TypeError)) as excinfo:
            modulated_deform_conv(*args, **kwargs, backend=c["backend"])
        assert any(p in str(excinfo.value) for p in problems), (problems, str(excinfo.value))
        return
    out = modulated_deform_conv(*args, **kwargs, backend=c["backend"])
    dtype = _floating(*(v.dtype for v in t.values() if v is not None))
    assert out.dtype == dtype
    assert out.shape == (c["n"], c["c_out"], *out_hw)
    assert torch.isfinite(out).all()
    # The reference, on the very values the op received (rounded to their dtypes).
    s, p, d = (_pair_ok(c[k], 0)[1] for k in ("stride", "padding", "dilation"))
    expected = reference(
        t["x"], t["offset"], t["mask"], t["weight"], t["bias"], s, p, d, c["groups"], c["dg"]
    )
    # Low precision: the op may compute in float32 and round once, or round as it goes.
    scale = 1.0 + float(expected.abs().max()) if expected.numel() else 1.0
    tol = _TOL[dtype] * scale
    torch.testing.assert_close(out.double(), expected, rtol=_TOL[dtype], atol=tol)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    c=any_calls(),
    in_delta=st.sampled_from([0, 0, 1]),
    channels=st.sampled_from([(None, None), (0, None), (None, 0), (-1, None)]),
)
def test_layers_build_and_run_or_raise_clear_errors(c, in_delta, channels):
    c_in = c["c_in"] if channels[0] is None else channels[0]
    c_out = c["c_out"] if channels[1] is None else channels[1]
    layer_cls = ModulatedDeformConv if c["modulated"] else DeformConv
    kwargs = dict(
        stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=c["groups"],
        deformable_groups=c["dg"], bias=c["bias"], backend=c["backend"],
    )  # fmt: skip
    problems, out_hw = _expected_problems(dict(c, weight_in_delta=0, offset_delta=0))
    problems = [p for p in problems if p not in ("too small", "weight")]
    if c_in < 1 or c_out < 1:
        problems.append("channels")
    if "groups" not in problems and (c_in % c["groups"] or c_out % c["groups"]):
        problems.append("groups")
    if "deformable_groups" not in problems and c_in % c["dg"]:
        problems.append("deformable_groups")
    if problems:
        with pytest.raises((ValueError, TypeError)) as excinfo:
            layer_cls(c_in, c_out, c["kernel"], **kwargs)
        assert any(p in str(excinfo.value) for p in problems), (problems, str(excinfo.value))
        return
    layer = layer_cls(c_in, c_out, c["kernel"], **kwargs).to(c["dtype"])
    assert layer.offset_channels == 2 * c["dg"] * c["kernel"][0] * c["kernel"][1]
    t = _build(dict(c, other_dtype=None, weight_in_delta=0, offset_delta=0), out_hw)
    x = t["x"]
    if in_delta:  # an input with the wrong number of channels
        x = torch.cat([x, x[:, :1]], dim=1)
    inputs = (x, t["offset"], t["mask"]) if c["modulated"] else (x, t["offset"])
    if in_delta or out_hw[0] < 1 or out_hw[1] < 1:
        with pytest.raises(ValueError, match="channels|too small|weight"):
            layer(*inputs)
        return
    out = layer(*inputs)
    bias = layer.bias.detach() if layer.bias is not None else None
    mask = t["mask"] if c["modulated"] else None
    s, p, d = (_pair_ok(c[k], 0)[1] for k in ("stride", "padding", "dilation"))
    expected = reference(
        x, t["offset"], mask, layer.weight.detach(), bias, s, p, d, c["groups"], c["dg"]
    )
    assert out.dtype == c["dtype"] and out.shape == expected.shape
    assert torch.isfinite(out).all()
    scale = 1.0 + float(expected.abs().max()) if expected.numel() else 1.0
    tol = _TOL[c["dtype"]]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * scale)
