"""What ``backend="auto"`` resolves to: on the CPU this package's native op, then torchvision;
on CUDA detectron2's compiled kernels when ``detectron2._C`` imports, then torchvision (the
measured order: native's PyTorch-op kernels are far slower on CUDA), then native. CUDA and
detectron2's ops are faked, so this runs on any machine."""

import pytest
import torch

from dcnv2.layers import backends


@pytest.fixture(autouse=True)
def fresh_support_cache(monkeypatch):
    # What each backend supports is cached per (backend, device type): start each test empty.
    monkeypatch.setattr(backends, "_SUPPORTED", {})


def _fake_d2_ops():
    return (lambda *a: None, lambda *a: None)


@pytest.fixture
def cuda_with_d2_ops(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "_detectron2_ops", _fake_d2_ops)


@pytest.fixture
def cuda_without_d2_ops(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "_detectron2_ops", lambda: None)


def test_cpu_auto_is_native():
    assert backends._native_ops() is not None  # the package's own op imports here
    assert backends.resolve_backend("auto", torch.device("cpu")) == "native"
    assert backends.resolve_backend("auto", "cpu") == "native"


def test_cpu_auto_falls_back_to_torchvision_without_native(monkeypatch):
    monkeypatch.setattr(backends, "_native_ops", lambda: None)
    assert backends.resolve_backend("auto", "cpu") == "torchvision"
    assert backends.available_backends("cpu") == ["torchvision"]


def test_cpu_never_picks_detectron2_even_with_its_ops(monkeypatch):
    monkeypatch.setattr(backends, "_detectron2_ops", _fake_d2_ops)
    assert backends.resolve_backend("auto", "cpu") == "native"
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        backends.resolve_backend("detectron2", "cpu")


def test_cuda_auto_is_detectron2_when_its_ops_import(cuda_with_d2_ops):
    assert backends.resolve_backend("auto", torch.device("cuda", 0)) == "detectron2"
    assert backends.available_backends("cuda") == ["detectron2", "native", "torchvision"]
    assert backends.available_backends() == ["detectron2", "native", "torchvision"]


def test_cuda_auto_is_torchvision_without_detectron2s_ops(cuda_without_d2_ops):
    assert backends.resolve_backend("auto", "cuda") == "torchvision"
    assert backends.available_backends("cuda") == ["native", "torchvision"]
    with pytest.raises(ValueError, match=r"available here: \['native', 'torchvision'\]"):
        backends.resolve_backend("detectron2", "cuda")


def test_cuda_auto_is_native_only_without_torchvision(cuda_without_d2_ops, monkeypatch):
    without_torchvision = {k: v for k, v in backends.BACKENDS.items() if k != "torchvision"}
    monkeypatch.setattr(backends, "BACKENDS", without_torchvision)
    assert backends.resolve_backend("auto", "cuda") == "native"


def test_cuda_auto_is_torchvision_without_native(cuda_without_d2_ops, monkeypatch):
    monkeypatch.setattr(backends, "_native_ops", lambda: None)
    assert backends.resolve_backend("auto", "cuda") == "torchvision"


def test_explicit_names_are_kept_and_unknown_ones_refused():
    assert backends.resolve_backend("torchvision", "cpu") == "torchvision"
    assert backends.resolve_backend("native", "cpu") == "native"
    with pytest.raises(ValueError, match="Unknown deformable-conv backend 'cudnn'"):
        backends.resolve_backend("cudnn", "cpu")
