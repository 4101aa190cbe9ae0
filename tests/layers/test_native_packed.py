"""The native backend's packed AVX2 products (``csrc/gemm_cpu.cpp``) and fused forward, and the
measured choice between the ways of computing each product: every way gives the float64
reference's result, and the choice changes only speed."""

import time

import pytest
import torch
from torch.nn.modules.utils import _pair

from dcnv2.layers import native, native_cpp
from dcnv2.layers.reference import deform_conv_reference, output_size

PACKED = pytest.mark.skipif(
    not native_cpp.gemm_supported(), reason="needs the compiled kernels and an AVX2+FMA CPU"
)


def _scale(t: torch.Tensor) -> float:
    return max(1.0, t.abs().max().item())


def _operand(rows, cols, transposed, g):
    """A (rows, cols) float32 matrix, row-major or a transposed view (unit row stride)."""
    if transposed:
        return torch.randn(cols, rows, generator=g).t()
    return torch.randn(rows, cols, generator=g)


@PACKED
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 5, 3), (13, 300, 37), (130, 600, 250)])
@pytest.mark.parametrize("a_t", [False, True])
@pytest.mark.parametrize("b_t", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
def test_gemm_matches_float64(shape, a_t, b_t, accumulate):
    """Edge tiles (M not a multiple of 6, N not of 16), several depth blocks (K > 256), both
    operand layouts, and a strided output slice whose neighbours stay untouched."""
    m, k, n = shape
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    a, b = _operand(m, k, a_t, g), _operand(k, n, b_t, g)
    full = torch.randn(m, n + 9, generator=g)
    before = full.clone()
    c = full[:, 4 : 4 + n]
    native_cpp.gemm(a, b, c, accumulate)
    expected = a.double() @ b.double() + (before[:, 4 : 4 + n].double() if accumulate else 0)
    torch.testing.assert_close(c.double(), expected, rtol=1e-5, atol=1e-5 * k**0.5)
    torch.testing.assert_close(full[:, :4], before[:, :4], rtol=0, atol=0)
    torch.testing.assert_close(full[:, 4 + n :], before[:, 4 + n :], rtol=0, atol=0)


@PACKED
def test_gemm_literal_values_and_empty_depth():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[5.0, 6.0, 7.0], [8.0, 9.0, 10.0]])
    c = torch.full((2, 3), 100.0)
    native_cpp.gemm(a, b, c, True)
    assert c.tolist() == [[121.0, 124.0, 127.0], [147.0, 154.0, 161.0]]
    native_cpp.gemm(torch.empty(2, 0), torch.empty(0, 3), c, False)
    assert (c == 0).all()


@PACKED
def test_pack_rows16_of_a_convolution_weight_is_the_packed_weight_rows():
    """A (C_out, C, kh, kw) weight packs as its rows (C_out, kh*kw*C) in (tap, channel) order:
    C = 40 crosses the 32-channel blocks of the packing."""
    weight = torch.randn(20, 40, 2, 3, generator=torch.Generator().manual_seed(4))
    rows = native._weight_rows(weight, 1)[0]
    assert torch.equal(native_cpp.pack_rows16(weight), native_cpp.pack_rows16(rows))
    assert torch.equal(native_cpp.pack_rows16(weight)[1, 5 * 40 + 7, 3], weight[19, 7, 1, 2])


@PACKED
def test_pack_rows16_layout():
    """Row r of the (M, D) matrix is column r % 16 of panel r // 16; rows past M are zero."""
    w = torch.arange(20 * 3, dtype=torch.float32).view(20, 3)
    packed = native_cpp.pack_rows16(w)
    assert packed.shape == (2, 3, 16)
    for r in range(32):
        expected = w[r] if r < 20 else torch.zeros(3)
        assert torch.equal(packed[r // 16, :, r % 16], expected)


FUSED_CASES = [
    # n, C, H, W, C_out, kernel, stride, padding, dilation, dg, mask
    (2, 8, 7, 9, 20, (3, 3), 1, 1, 1, 1, True),  # C_out not a multiple of 16
    (1, 12, 11, 13, 5, (3, 3), 2, 1, 2, 2, True),  # stride, dilation, 2 offset groups
    (2, 16, 9, 8, 33, (3, 3), 1, 2, 1, 4, False),  # DCNv1
    (3, 5, 6, 7, 3, (2, 3), (1, 2), (0, 1), 1, 1, True),  # 11 positions: an edge panel
    (1, 24, 30, 31, 40, (3, 3), 1, 1, 1, 1, True),  # several position blocks per image
]


@PACKED
@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_forward_matches_reference(case, monkeypatch):
    n, c, h, w, c_out, kernel, s, p, d, dg, with_mask = case
    s, p, d = _pair(s), _pair(p), _pair(d)
    g = torch.Generator().manual_seed(c_out)
    ho, wo = output_size((h, w), kernel, s, p, d)
    taps = kernel[0] * kernel[1]
    x = torch.randn(n, c, h, w, generator=g)
    # Offsets up to 5 pixels: many taps fall outside the image or on its border.
    offset = (torch.rand(n, 2 * dg * taps, ho, wo, generator=g) - 0.5) * 10
    mask = torch.rand(n, dg * taps, ho, wo, generator=g) if with_mask else None
    weight = torch.randn(c_out, c, *kernel, generator=g)
    bias = torch.randn(c_out, generator=g)
    key = ("forward_pass", tuple(weight.shape), torch.float32, torch.get_num_threads())
    monkeypatch.setattr(native, "_FASTEST", {key: "fused"})
    calls = []
    monkeypatch.setattr(
        native_cpp, "forward_packed", lambda *a: calls.append(1) or _real_forward_packed(*a)
    )
    out = native.forward(x, offset, mask, weight, bias, s, p, d, 1, dg, impl="cpp")
    expected = deform_conv_reference(
        x, offset, mask, weight, bias, torch.zeros(n, c_out, ho, wo), s, p, d, 1, dg
    )["out"]
    assert calls == [1]
    # float32 rounding of sums of up to 216 products: relative to the output's scale
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6 * _scale(expected))


_real_forward_packed = native_cpp.forward_packed


@PACKED
@pytest.mark.parametrize("groups", [1, 2])
def test_packed_backward_products_match_reference(groups, monkeypatch):
    """The column and weight gradients through the packed gemm (forced), with chunks that split
    images into position ranges: every gradient is the reference's."""
    g = torch.Generator().manual_seed(11 + groups)
    n, c, h, w, c_out = 2, 8, 6, 7, 6
    x = torch.randn(n, c, h, w, generator=g)
    offset = (torch.rand(n, 36, h, w, generator=g) - 0.5) * 6
    mask = torch.rand(n, 18, h, w, generator=g)
    weight = torch.randn(c_out, c // groups, 3, 3, generator=g)
    upstream = torch.randn(n, c_out, h, w, generator=g)
    threads = torch.get_num_threads()
    wshape = (groups, c_out // groups, 9 * c // groups)
    forced = {
        ("column_gradient", wshape, torch.float32, threads): "packed",
        ("weight_gradient", (groups, c_out // groups, 9 * c // groups), torch.float32, threads): (
            "packed"
        ),
    }
    monkeypatch.setattr(native, "_FASTEST", forced)
    monkeypatch.setattr(native, "_CHUNK_ELEMENTS", 300)
    grads = native.backward(
        upstream, x, offset, mask, weight, (1, 1), (1, 1), (1, 1), groups, 2, [True] * 5, "cpp"
    )
    ref = deform_conv_reference(x, offset, mask, weight, None, upstream, (1, 1), (1, 1), (1, 1),
                                groups, 2)  # fmt: skip
    for got, name in zip(grads[:4], ("input", "offset", "mask", "weight")):
        torch.testing.assert_close(
            got.double(), ref[name], rtol=1e-5, atol=1e-6 * _scale(ref[name])
        )


def test_run_fastest_measures_once_and_keeps_the_fastest(monkeypatch):
    """Each way runs twice from the same starting output (so an accumulating way adds once),
    the fastest is kept for the key and left the output; later calls run only it."""
    monkeypatch.setattr(native, "_FASTEST", {})
    monkeypatch.setattr(native, "_MEASURE_MACS", 100)
    runs = []

    out = torch.full((3,), 10.0)
    other = torch.full((2,), 1.0)

    def way(name, delay, value):
        def run():
            runs.append(name)
            time.sleep(delay)
            out.add_(value)
            other.add_(value)

        return run

    ways = {"slow": way("slow", 0.02, 1.0), "fast": way("fast", 0.0, 2.0)}
    native._run_fastest(("k",), ways, [out, other], macs=100)
    assert native._FASTEST == {("k",): "fast"}
    assert runs == ["slow", "fast", "slow", "fast"]
    # the fast way's result, added once, in every output
    assert out.tolist() == [12.0] * 3 and other.tolist() == [3.0] * 2
    runs.clear()
    native._run_fastest(("k",), ways, [out, other], macs=100)
    assert runs == ["fast"] and out.tolist() == [14.0] * 3
    # Too small to time, and a new key: the first way, nothing recorded.
    native._run_fastest(("small",), ways, [out, other], macs=99)
    assert "small" not in {k[0] for k in native._FASTEST} and out.tolist() == [15.0] * 3


def test_run_fastest_reruns_the_winner_when_another_way_ran_last(monkeypatch):
    monkeypatch.setattr(native, "_FASTEST", {})
    monkeypatch.setattr(native, "_MEASURE_MACS", 0)
    runs = []
    out = torch.zeros(2)
    ways = {
        "fast": lambda: runs.append("fast") or out.fill_(1.0),
        "slow": lambda: runs.append("slow") or time.sleep(0.02) or out.fill_(2.0),
    }
    native._run_fastest(("k",), ways, [out], macs=1)
    assert runs == ["fast", "slow", "fast", "slow", "fast"] and out.tolist() == [1.0, 1.0]


def test_forward_pass_choice_is_per_weight_shape(monkeypatch):
    """The forward pass is measured once per weight shape (not per image size); either way
    gives the reference's output, and float64 offers only the chunked way."""
    g = torch.Generator().manual_seed(8)
    monkeypatch.setattr(native, "_FASTEST", {})
    monkeypatch.setattr(native, "_MEASURE_MACS", 0)
    x = torch.randn(2, 3, 5, 6, generator=g)
    offset = torch.randn(2, 18, 5, 6, generator=g) * 2
    mask = torch.rand(2, 9, 5, 6, generator=g)
    weight = torch.randn(4, 3, 3, 3, generator=g)
    geometry = ((1, 1), (1, 1), (1, 1), 1, 1)
    native.forward(x, offset, mask, weight, None, *geometry)
    key = ("forward_pass", (4, 3, 3, 3), torch.float32, torch.get_num_threads())
    expected_ways = {"chunked", "fused"} if native_cpp.gemm_supported() else {"chunked"}
    assert native._FASTEST[key] in expected_ways
    for way in expected_ways:
        native._FASTEST[key] = way
        for width in (6, 4):  # another image size: same key, no new measurement
            args = (x[..., :width], offset[..., :width], mask[..., :width], weight)
            out = native.forward(*args, None, *geometry)
            ref = deform_conv_reference(*args, None, torch.zeros_like(out), *geometry)["out"]
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6 * _scale(ref))
    assert [k for k in native._FASTEST if k[0] == "forward_pass"] == [key]
    native.forward(x.double(), offset.double(), mask.double(), weight.double(), None, *geometry)
    key64 = ("forward_pass", (4, 3, 3, 3), torch.float64, torch.get_num_threads())
    assert key64 not in native._FASTEST  # one way only: nothing to measure


BACKWARD_NEEDS = [
    (True, True, True, True),
    (True, False, True, True),
    (False, True, False, False),
    (False, False, False, True),
]


@PACKED
@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.parametrize("needs", BACKWARD_NEEDS)
def test_fused_backward_matches_reference(case, needs, monkeypatch):
    """The fused backward (forced) gives the reference's gradients, for any subset asked for:
    channel blocks cut at panels of 16 (C = 24: blocks of 16 and 8 channels with 2 threads),
    edge position panels, offset groups, DCNv1."""
    n, c, h, w, c_out, kernel, s, p, d, dg, with_mask = case
    s, p, d = _pair(s), _pair(p), _pair(d)
    g = torch.Generator().manual_seed(c_out + 1)
    ho, wo = output_size((h, w), kernel, s, p, d)
    taps = kernel[0] * kernel[1]
    x = torch.randn(n, c, h, w, generator=g)
    offset = (torch.rand(n, 2 * dg * taps, ho, wo, generator=g) - 0.5) * 10
    mask = torch.rand(n, dg * taps, ho, wo, generator=g) if with_mask else None
    weight = torch.randn(c_out, c, *kernel, generator=g)
    upstream = torch.randn(n, c_out, ho, wo, generator=g)
    need_x, need_offset, need_mask, need_weight = needs
    need_mask = need_mask and with_mask
    key = (
        "backward_pass",
        tuple(weight.shape),
        (need_x, need_offset, need_mask, need_weight),
        torch.float32,
        torch.get_num_threads(),
    )
    monkeypatch.setattr(native, "_FASTEST", {key: "fused"})
    calls = []
    monkeypatch.setattr(
        native_cpp, "backward_packed", lambda *a: calls.append(1) or _real_backward_packed(*a)
    )
    grads = native.backward(upstream, x, offset, mask, weight, s, p, d, 1, dg, [*needs, False])
    ref = deform_conv_reference(x, offset, mask, weight, None, upstream, s, p, d, 1, dg)
    assert calls == [1]
    wanted = (need_x, need_offset, need_mask, need_weight)
    for got, name, want in zip(grads[:4], ("input", "offset", "mask", "weight"), wanted):
        if not want:
            assert got is None
            continue
        torch.testing.assert_close(
            got.double(), ref[name], rtol=1e-5, atol=1e-6 * _scale(ref[name])
        )


_real_backward_packed = native_cpp.backward_packed


@PACKED
@pytest.mark.parametrize("threads", [1, 3])
def test_fused_backward_thread_counts(threads):
    """Channel blocks follow the thread count (48 channels: 1 block, or 3 blocks of 16 cutting
    through 2 offset groups of 24); the gradients do not depend on it."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 48, 6, 7, generator=g)
    offset = (torch.rand(2, 36, 6, 7, generator=g) - 0.5) * 6
    mask = torch.rand(2, 18, 6, 7, generator=g)
    weight = torch.randn(8, 48, 3, 3, generator=g)
    upstream = torch.randn(2, 8, 6, 7, generator=g)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        key = ("backward_pass", (8, 48, 3, 3), (True,) * 4, torch.float32, threads)
        native._FASTEST[key] = "fused"
        grads = native.backward(
            upstream, x, offset, mask, weight, (1, 1), (1, 1), (1, 1), 1, 2, [True] * 4 + [False]
        )
    finally:
        native._FASTEST.pop(("backward_pass", (8, 48, 3, 3), (True,) * 4, torch.float32, threads))
        torch.set_num_threads(previous)
    ref = deform_conv_reference(
        x, offset, mask, weight, None, upstream, (1, 1), (1, 1), (1, 1), 1, 2
    )
    for got, name in zip(grads[:4], ("input", "offset", "mask", "weight")):
        torch.testing.assert_close(
            got.double(), ref[name], rtol=1e-5, atol=1e-6 * _scale(ref[name])
        )
