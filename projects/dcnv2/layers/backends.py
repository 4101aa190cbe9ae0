"""Implementations ("backends") of the deformable convolution op, and how one is chosen.

"detectron2" (its CUDA kernels, when ``detectron2._C`` imports), "torchvision" and "native"
(:mod:`.native`, any device); all share detectron2's offset layout.
"""

import functools
import logging
import os
from typing import Dict, List, Mapping, Optional, Tuple

import torch

__all__ = ["available_backends", "resolve_backend", "resolve_native_impl", "BACKEND_NAMES"]

logger = logging.getLogger(__name__)

# Every value MODEL.DCNV2.BACKEND / the layers' ``backend`` accept.
BACKEND_NAMES = ("auto", "detectron2", "native", "torchvision")
NATIVE_IMPLS = ("auto", "cpp", "torch")
# Preference order of "auto" per device type; on CUDA the native torch kernels are slow.
_AUTO_ORDER = {"cuda": ("detectron2", "torchvision", "native"), "cpu": ("native", "torchvision")}


@functools.lru_cache(maxsize=None)
def _detectron2_ops():
    """detectron2's compiled deformable-conv functions, or None when ``detectron2._C`` is absent."""
    try:
        from detectron2 import _C  # noqa: F401
        from detectron2.layers.deform_conv import deform_conv, modulated_deform_conv
    except ImportError:
        return None
    return deform_conv, modulated_deform_conv


@functools.lru_cache(maxsize=None)
def _native_ops():
    try:
        from . import native
    except ImportError as e:  # the native backend is optional: say so once and carry on
        logger.warning("dcnv2: native deformable-conv backend unavailable (%s)", e)
        return None
    return native


# (name, device type) -> usable; a plain dict, so that torch.compile reads it as a constant.
_SUPPORTED: Dict[Tuple[str, str], bool] = {}


def _supports(name: str, device_type: str) -> bool:
    key = (name, device_type)
    if key not in _SUPPORTED:
        _SUPPORTED[key] = name in BACKENDS and (
            name == "torchvision"
            or (name == "native" and _native_ops() is not None)
            or (name == "detectron2" and device_type == "cuda" and _detectron2_ops() is not None)
        )
    return _SUPPORTED[key]


def available_backends(device: Optional[torch.device] = None) -> List[str]:
    """Names of the backends that can run on ``device`` (default: on CPU or, if present, CUDA)."""
    if device is not None:
        device_types = [torch.device(device).type]
    else:
        device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    names = ("detectron2", "native", "torchvision")
    return [name for name in names if any(_supports(name, t) for t in device_types)]


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``"auto"`` into a concrete backend for ``device`` and check the choice is usable."""
    device_type = torch.device(device).type
    if backend == "auto":
        for name in _AUTO_ORDER.get(device_type, ("native", "torchvision")):
            if _supports(name, device_type):
                return name
        raise RuntimeError(f"No deformable-conv backend supports device {device}")
    if backend not in BACKEND_NAMES:
        raise ValueError(
            f"Unknown deformable-conv backend {backend!r}; expected one of "
            f"{', '.join(map(repr, BACKEND_NAMES))}"
        )
    if not _supports(backend, device_type):
        reason = ""
        if backend == "detectron2":
            reason = (
                " (it needs CUDA tensors and a detectron2 built with its compiled ops, "
                "i.e. `from detectron2 import _C` must work)"
            )
        raise ValueError(
            f"Deformable-conv backend {backend!r} is not available for {device_type} tensors"
            f"{reason}; available here: {available_backends(device)}"
        )
    return backend


def native_impl_from_environment(environ: Mapping[str, str] = os.environ) -> str:
    """The native implementation ``native_impl="auto"`` stands for (``DCNV2_NATIVE_IMPL``)."""
    value = environ.get("DCNV2_NATIVE_IMPL") or "auto"
    if value not in NATIVE_IMPLS:
        raise ValueError(f"DCNV2_NATIVE_IMPL must be 'auto', 'cpp' or 'torch', got {value!r}")
    return value


# Read once: the library never reads (or writes) the environment on a call.
_NATIVE_IMPL_DEFAULT = native_impl_from_environment()


def resolve_native_impl(native_impl: str) -> str:
    """``native_impl`` with "auto" replaced by the environment's choice."""
    if native_impl not in NATIVE_IMPLS:
        raise ValueError(
            f"Unknown native implementation {native_impl!r}; expected one of {NATIVE_IMPLS}"
        )
    return _NATIVE_IMPL_DEFAULT if native_impl == "auto" else native_impl


# Every backend is fn(input, offset, mask, weight, bias, stride, padding, dilation, groups, dg,
# native_impl) -> output, recording no autograd graph (but detectron2's, which runs outside the
# custom operator); its backward, fn(grad_out, input, offset, mask, weight, stride, padding,
# dilation, groups, dg, needs, native_impl) -> [grad_input, grad_offset, grad_mask, grad_weight,
# grad_bias].
def _torchvision_backend(
    input, offset, mask, weight, bias, stride, padding, dilation, groups, dg, native_impl
):
    # torchvision infers groups from the weight and deformable groups from the offset.
    from torchvision.ops import deform_conv2d

    return deform_conv2d(
        input, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask
    )


def _torchvision_backward(
    grad_out, input, offset, mask, weight, stride, padding, dilation, groups, dg, needs, native_impl
):
    import torchvision  # noqa: F401  (registers torchvision's ops)

    use_mask = mask is not None
    zeros = input.new_zeros(())
    mask = mask.contiguous() if use_mask else zeros.expand(offset.shape[0], 0, *offset.shape[2:])
    grads = torch.ops.torchvision._deform_conv2d_backward(
        grad_out.contiguous(), input.contiguous(), weight.contiguous(), offset.contiguous(), mask,
        zeros.expand(weight.shape[0]).contiguous(), *stride, *padding, *dilation, groups, dg,
        use_mask,
    )  # fmt: skip
    grad_input, grad_weight, grad_offset, grad_mask, grad_bias = grads
    ordered = [grad_input, grad_offset, grad_mask if use_mask else None, grad_weight, grad_bias]
    return [g if need else None for g, need in zip(ordered, needs)]


def _detectron2_backend(
    input, offset, mask, weight, bias, stride, padding, dilation, groups, dg, native_impl
):
    deform_conv, modulated_deform_conv = _detectron2_ops()
    # The CUDA kernels index raw memory: they need contiguous tensors.
    input, offset, weight = input.contiguous(), offset.contiguous(), weight.contiguous()
    if mask is None:
        # detectron2's DCNv1 kernel takes (h, w) pairs and has no bias.
        out = deform_conv(input, offset, weight, stride, padding, dilation, groups, dg)
        return out if bias is None else out + bias.view(1, -1, 1, 1)
    # detectron2's modulated kernel takes one int for both directions.
    for name, value in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if value[0] != value[1]:
            raise ValueError(
                f"The detectron2 backend supports only equal vertical and horizontal {name}, "
                f"got {value}; use backend='native' or 'torchvision'"
            )
    return modulated_deform_conv(
        input, offset, mask.contiguous(), weight, bias, stride[0], padding[0], dilation[0],
        groups, dg,
    )  # fmt: skip


# The native module is imported on first use, so its import problems never break dcnv2.
def _native_backend(*args):
    return _native_ops().forward(*args)


def _native_backward(*args):
    return _native_ops().backward(*args)


BACKENDS = {
    "detectron2": _detectron2_backend,
    "native": _native_backend,
    "torchvision": _torchvision_backend,
}
BACKWARDS = {"native": _native_backward, "torchvision": _torchvision_backward}
