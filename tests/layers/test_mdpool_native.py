"""The compiled mdpool kernels (``dcnv2.layers.mdpool_cpp``) against the PyTorch-op implementation
of ``deform_roi_align`` (float64, forward and both gradients to 1e-10), gradcheck of the
kernels, empty inputs, how the implementation is chosen, and the fallback when the build
fails."""

import logging

import pytest
import torch
from torchvision.ops import roi_align

from dcnv2.layers import backends, mdpool, mdpool_cpp
from dcnv2.layers.mdpool import deform_roi_align

pytestmark = pytest.mark.skipif(
    not mdpool_cpp.is_available(warn=False), reason="the compiled mdpool kernels did not build"
)


def _inputs(num_rois=40, channels=5, size=(23, 31), dtype=torch.float64, seed=0):
    """Two images and RoIs of every kind: inside, partly or entirely outside, degenerate."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    features = torch.randn(2, channels, h, w, generator=g).to(dtype)
    # Image coordinates at scale 1/4: the map covers [0, 4w) x [0, 4h).
    xy = torch.rand(num_rois, 2, generator=g) * torch.tensor([5.0 * w, 5.0 * h]) - 0.5 * h
    wh = torch.rand(num_rois, 2, generator=g) * torch.tensor([3.0 * w, 3.0 * h])
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[0] = torch.tensor([-30.0, -20.0, 40.0, 35.0])  # partly outside, top-left
    boxes[1] = torch.tensor([100.0, 70.0, 200.0, 150.0])  # partly outside, bottom-right
    boxes[2] = torch.tensor([500.0, 400.0, 560.0, 470.0])  # entirely outside
    boxes[3] = torch.tensor([20.0, 30.0, 20.0, 50.0])  # zero width
    boxes[4] = torch.tensor([20.0, 30.0, 10.0, 50.0])  # negative width
    batch = torch.randint(0, 2, (num_rois, 1), generator=g).float()
    rois = torch.cat([batch, boxes], 1).to(dtype)
    offset = torch.randn(num_rois, 2, 7, 7, generator=g).to(dtype)
    return features, rois, offset


def _run(impl, features, rois, offset, grad, **kwargs):
    features = features.clone().requires_grad_()
    offset = offset.clone().requires_grad_()
    out = deform_roi_align(
        features, rois, offset, output_size=7, spatial_scale=0.25, impl=impl, **kwargs
    )
    (out * grad).sum().backward()
    return out, features.grad, offset.grad


@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("gamma", [0.1, 0.7])
def test_kernels_equal_the_pytorch_ops_forward_and_backward(sampling_ratio, aligned, gamma):
    features, rois, offset = _inputs()
    grad = torch.randn(len(rois), 5, 7, 7, dtype=torch.float64)
    kwargs = dict(sampling_ratio=sampling_ratio, aligned=aligned, gamma=gamma)
    out, grad_features, grad_offset = _run("cpp", features, rois, offset, grad, **kwargs)
    ref, ref_features, ref_offset = _run("torch", features, rois, offset, grad, **kwargs)
    assert ref.abs().max() > 0.5 and ref_offset.abs().max() > 0.5  # not a trivial case
    assert out[2].abs().max() == 0  # entirely outside the map
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad_features, ref_features, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad_offset, ref_offset, atol=1e-10, rtol=0)


def test_kernels_equal_the_pytorch_ops_without_offset_and_in_float32():
    features, rois, offset = _inputs(dtype=torch.float32, seed=1)
    for off in (None, offset):
        out = deform_roi_align(features, rois, off, output_size=7, spatial_scale=0.25, impl="cpp")
        ref = deform_roi_align(features, rois, off, output_size=7, spatial_scale=0.25, impl="torch")
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampling_ratio", [-1, 0])
@pytest.mark.parametrize("aligned", [True, False])
def test_non_positive_sampling_ratio_is_adaptive_in_both_implementations(sampling_ratio, aligned):
    # torchvision's (and mmcv's) RoIAlign: sampling_ratio <= 0 is ceil(roi size / bins) per RoI.
    features, rois, offset = _inputs()
    reference = roi_align(features, rois, 7, 0.25, sampling_ratio, aligned)
    assert reference.abs().max() > 0.5
    for impl in ("cpp", "torch"):
        for off in (None, torch.zeros_like(offset)):
            out = deform_roi_align(
                features, rois, off, output_size=7, spatial_scale=0.25,
                sampling_ratio=sampling_ratio, aligned=aligned, impl=impl,
            )  # fmt: skip
            torch.testing.assert_close(out, reference, atol=1e-12, rtol=0)
    features, rois, offset = _inputs(num_rois=6, channels=2, size=(6, 7), seed=3)
    features.requires_grad_()
    offset = (0.5 * offset[:, :, :2, :3]).requires_grad_()

    def pool(f, o):
        return deform_roi_align(
            f, rois, o, output_size=(2, 3), spatial_scale=0.25, sampling_ratio=sampling_ratio,
            aligned=aligned, impl="torch",
        )  # fmt: skip

    assert torch.autograd.gradcheck(pool, (features, offset), eps=1e-6, atol=1e-6)


def test_gradcheck_of_the_kernels():
    features, rois, offset = _inputs(num_rois=6, channels=2, size=(6, 7), seed=2)
    features.requires_grad_()
    offset = (0.5 * offset[:, :, :2, :3]).requires_grad_()

    def pool(f, o):
        return deform_roi_align(f, rois, o, output_size=(2, 3), spatial_scale=0.25, impl="cpp")

    assert torch.autograd.gradcheck(pool, (features, offset), eps=1e-6, atol=1e-6)


def test_empty_roi_tensor():
    features = torch.randn(2, 3, 8, 9, dtype=torch.float64, requires_grad=True)
    offset = torch.zeros(0, 2, 7, 7, dtype=torch.float64, requires_grad=True)
    out = deform_roi_align(features, torch.zeros(0, 5), offset, output_size=7, impl="cpp")
    assert out.shape == (0, 3, 7, 7) and out.dtype == torch.float64
    out.sum().backward()
    assert features.grad.shape == features.shape and features.grad.abs().max() == 0
    assert offset.grad.shape == (0, 2, 7, 7)


def test_bad_batch_index_is_an_error():
    features = torch.randn(1, 3, 8, 9)
    with pytest.raises(RuntimeError, match="batch index"):
        deform_roi_align(features, torch.tensor([[1.0, 0, 0, 4, 4]]), output_size=7, impl="cpp")


def _count_kernel_calls(monkeypatch):
    calls = []
    apply = mdpool._DeformRoIAlign.apply
    monkeypatch.setattr(
        mdpool._DeformRoIAlign, "apply", lambda *args: calls.append(1) or apply(*args)
    )  # fmt: skip
    return calls


def test_auto_uses_the_kernels_where_they_apply(monkeypatch):
    monkeypatch.setattr(backends, "_NATIVE_IMPL_DEFAULT", "auto")
    calls = _count_kernel_calls(monkeypatch)
    features, rois, offset = _inputs()
    deform_roi_align(features, rois, offset, output_size=7)
    assert len(calls) == 1
    # Not for bfloat16, nor for RoIs that need a gradient: the PyTorch ops then.
    deform_roi_align(features.bfloat16(), rois, offset, output_size=7)
    deform_roi_align(features, rois.clone().requires_grad_(), offset, output_size=7)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="CPU float32/float64"):
        deform_roi_align(features.bfloat16(), rois, offset, output_size=7, impl="cpp")
    with pytest.raises(ValueError, match="Unknown mdpool implementation"):
        deform_roi_align(features, rois, offset, output_size=7, impl="fast")


def test_environment_choice_torch_skips_the_kernels(monkeypatch):
    # What DCNV2_NATIVE_IMPL=torch sets at import (see test_native.py for the parsing).
    monkeypatch.setattr(backends, "_NATIVE_IMPL_DEFAULT", "torch")
    calls = _count_kernel_calls(monkeypatch)
    features, rois, offset = _inputs()
    deform_roi_align(features, rois, offset, output_size=7)
    assert calls == []
    deform_roi_align(features, rois, offset, output_size=7, impl="cpp")
    assert len(calls) == 1


def test_failed_build_falls_back_with_one_warning(monkeypatch, caplog, unbuildable_extension):
    monkeypatch.setattr(backends, "_NATIVE_IMPL_DEFAULT", "auto")
    unbuildable_extension(mdpool_cpp)
    features, rois, offset = _inputs()
    with caplog.at_level(logging.WARNING, logger="dcnv2.layers.mdpool_cpp"):
        out = deform_roi_align(features, rois, offset, output_size=7, spatial_scale=0.25)
        deform_roi_align(features, rois, offset, output_size=7, spatial_scale=0.25)
    ref = mdpool._deform_roi_align_torch(features, rois, offset, (7, 7), 0.25, 0, 0.1, True)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert [r.getMessage().count("no compiler") for r in caplog.records] == [1]
    with pytest.raises(RuntimeError, match="failed to build: RuntimeError: no compiler"):
        deform_roi_align(features, rois, offset, output_size=7, impl="cpp")


def test_layer_with_kernels_equals_the_layer_with_pytorch_ops(monkeypatch):
    """The whole layer (its RoIAlign pass included) and its gradients, trained branches."""
    torch.manual_seed(0)
    layer = mdpool.ModulatedDeformRoIAlign(
        output_size=7, in_channels=5, spatial_scale=0.25, fc_dim=16
    ).double()
    for p in layer.parameters():
        p.data.normal_(0, 0.1)
    features, rois, _ = _inputs()
    grad = torch.randn(len(rois), 5, 7, 7, dtype=torch.float64)
    results = []
    for impl in ("auto", "torch"):
        monkeypatch.setattr(backends, "_NATIVE_IMPL_DEFAULT", impl)
        calls = _count_kernel_calls(monkeypatch)
        f = features.clone().requires_grad_()
        layer.zero_grad()
        out = layer(f, rois)
        (out * grad).sum().backward()
        assert len(calls) == (2 if impl == "auto" else 0)  # the RoIAlign pass and the pooling
        results.append((out, f.grad, [p.grad.clone() for p in layer.parameters()]))
    (out, grad_f, grads), (ref, ref_f, ref_grads) = results
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad_f, ref_f, atol=1e-10, rtol=0)
    assert ref_grads[0].abs().max() > 0
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)
