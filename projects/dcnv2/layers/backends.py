"""Implementations ("backends") of the deformable convolution op, and how one is chosen.

"detectron2" (its CUDA kernels, when ``detectron2._C`` imports), "torchvision" and "native"
(:mod:`.native`, any device); all share detectron2's offset layout.
"""

import functools
import logging
import os
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

__all__ = [
    "available_backends",
    "resolve_backend",
    "resolve_native_impl",
    "native_impl_from_environment",
    "BACKENDS",
    "BACKEND_NAMES",
    "BACKWARDS",
    "OP_BACKENDS",
]

logger = logging.getLogger(__name__)

# name -> fn(input, offset, mask, weight, bias, stride, padding, dilation, groups, dg,
# native_impl) -> output, recording no autograd graph.
BackendFn = Callable[..., torch.Tensor]
BACKENDS: Dict[str, BackendFn] = {}
# name -> fn(grad_out, input, offset, mask, weight, stride, padding, dilation, groups, dg, needs,
# native_impl) -> [grad_input, grad_offset, grad_mask, grad_weight, grad_bias].
BACKWARDS: Dict[str, Callable[..., List[Optional[torch.Tensor]]]] = {}
# Backends that run inside torch.ops.dcnv2.deform_conv2d.
OP_BACKENDS = ("native", "torchvision")
# Every value MODEL.DCNV2.BACKEND / the layers' ``backend`` accept.
BACKEND_NAMES = ("auto", "detectron2", "native", "torchvision")
# Preference order of "auto" per device type; on CUDA the native torch kernels are slow.
_AUTO_ORDER = {"cuda": ("detectron2", "torchvision", "native"), "cpu": ("native", "torchvision")}


def register_backend(name: str) -> Callable[[BackendFn], BackendFn]:
    def deco(fn: BackendFn) -> BackendFn:
        BACKENDS[name] = fn
        return fn

    return deco


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
        _SUPPORTED[key] = _check_support(name, device_type)
    return _SUPPORTED[key]


def _check_support(name: str, device_type: str) -> bool:
    if name == "torchvision":
        return True
    if name == "detectron2":
        return device_type == "cuda" and _detectron2_ops() is not None
    if name == "native":
        return _native_ops() is not None
    return False


def available_backends(device: Optional[torch.device] = None) -> List[str]:
    """Names of the backends that can run on ``device`` (default: on CPU or, if present, CUDA)."""
    if device is not None:
        device_types = [torch.device(device).type]
    else:
        device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    names = []
    for name in ("detectron2", "native", "torchvision"):
        if name in BACKENDS and any(_supports(name, t) for t in device_types):
            names.append(name)
    return names


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``"auto"`` into a concrete backend for ``device`` and check the choice is usable."""
    device_type = torch.device(device).type
    if backend == "auto":
        for name in _AUTO_ORDER.get(device_type, ("native", "torchvision")):
            if name in BACKENDS and _supports(name, device_type):
                return name
        raise RuntimeError(f"No deformable-conv backend supports device {device}")
    if backend not in BACKEND_NAMES:
        raise ValueError(
            f"Unknown deformable-conv backend {backend!r}; expected one of "
            f"{', '.join(map(repr, BACKEND_NAMES))}"
        )
    if backend not in BACKENDS or not _supports(backend, device_type):
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
    value = environ.get("DCNV2_NATIVE_IMPL", "auto") or "auto"
    if value not in ("auto", "cpp", "torch"):
        raise ValueError(f"DCNV2_NATIVE_IMPL must be 'auto', 'cpp' or 'torch', got {value!r}")
    return value


# Read once: the library never reads (or writes) the environment on a call.
_NATIVE_IMPL_DEFAULT = native_impl_from_environment()


def resolve_native_impl(native_impl: str) -> str:
    """``native_impl`` with "auto" replaced by the environment's choice (see the module doc)."""
    if native_impl not in ("auto", "cpp", "torch"):
        raise ValueError(
            f"Unknown native implementation {native_impl!r}; expected one of "
            "('auto', 'cpp', 'torch')"
        )
    return _NATIVE_IMPL_DEFAULT if native_impl == "auto" else native_impl


def traceable_backend(name: str) -> BackendFn:
    """The backend as ``torch.jit.trace`` should record it (outside the custom operator)."""
    if name == "native":

        def native_function(input, offset, mask, weight, bias, *geometry, native_impl="auto"):
            return _native_ops().deform_conv2d(
                input, offset, mask, weight, bias, *geometry, impl=native_impl
            )

        return native_function
    return BACKENDS[name]


@register_backend("torchvision")
def _torchvision_backend(
    input, offset, mask, weight, bias, stride, padding, dilation, groups, dg, native_impl="auto"
):
    # torchvision infers groups from the weight and deformable groups from the offset.
    from torchvision.ops import deform_conv2d

    del groups, dg, native_impl
    return deform_conv2d(
        input, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask
    )


def _square(name: str, value: Tuple[int, int]) -> int:
    if value[0] != value[1]:
        raise ValueError(
            f"The detectron2 backend supports only equal vertical and horizontal {name}, "
            f"got {value}; use backend='native' or 'torchvision'"
        )
    return value[0]


@register_backend("detectron2")
def _detectron2_backend(
    input, offset, mask, weight, bias, stride, padding, dilation, groups, dg, native_impl="auto"
):
    deform_conv, modulated_deform_conv = _detectron2_ops()
    # The CUDA kernels index raw memory: they need contiguous tensors.
    input, offset, weight = input.contiguous(), offset.contiguous(), weight.contiguous()
    if mask is not None:
        mask = mask.contiguous()
    if mask is None:
        # detectron2's DCNv1 kernel takes (h, w) pairs and has no bias.
        out = deform_conv(input, offset, weight, stride, padding, dilation, groups, dg)
        if bias is not None:
            out = out + bias.view(1, -1, 1, 1)
        return out
    # detectron2's modulated kernel takes one int for both directions.
    return modulated_deform_conv(
        input,
        offset,
        mask,
        weight,
        bias,
        _square("stride", stride),
        _square("padding", padding),
        _square("dilation", dilation),
        groups,
        dg,
    )


def _torchvision_backward(
    grad_out, input, offset, mask, weight, stride, padding, dilation, groups, dg, needs, native_impl
):
    import torchvision  # noqa: F401  (registers torchvision's ops)

    del native_impl
    use_mask = mask is not None
    zeros = input.new_zeros(())
    grads = torch.ops.torchvision._deform_conv2d_backward(
        grad_out.contiguous(),
        input.contiguous(),
        weight.contiguous(),
        offset.contiguous(),
        mask.contiguous() if use_mask else zeros.expand(offset.shape[0], 0, *offset.shape[2:]),
        zeros.expand(weight.shape[0]).contiguous(),
        *stride,
        *padding,
        *dilation,
        groups,
        dg,
        use_mask,
    )
    grad_input, grad_weight, grad_offset, grad_mask, grad_bias = grads
    ordered = [grad_input, grad_offset, grad_mask if use_mask else None, grad_weight, grad_bias]
    return [g if need else None for g, need in zip(ordered, needs)]


BACKWARDS["torchvision"] = _torchvision_backward


# Native registration is deferred to first use so its import problems never break dcnv2.
@register_backend("native")
def _native_backend(
    input, offset, mask, weight, bias, stride, padding, dilation, groups, dg, native_impl="auto"
):
    return _native_ops().forward(
        input, offset, mask, weight, bias, stride, padding, dilation, groups, dg, native_impl
    )


def _native_backward(
    grad_out, input, offset, mask, weight, stride, padding, dilation, groups, dg, needs, native_impl
):
    return _native_ops().backward(
        grad_out, input, offset, mask, weight, stride, padding, dilation, groups, dg, needs,
        native_impl,
    )  # fmt: skip


BACKWARDS["native"] = _native_backward
