"""Deformable convolution (DCNv1) and modulated deformable convolution (DCNv2) for detectron2.

detectron2's signatures (``detectron2.layers.deform_conv``) plus ``backend``
(:mod:`dcnv2.layers.backends`).
"""

import functools
import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from . import ops
from .backends import BACKENDS, resolve_backend, resolve_native_impl

__all__ = ["modulated_deform_conv", "deform_conv", "ModulatedDeformConv", "DeformConv"]

IntOrPair = Union[int, Sequence[int]]


def _as_pair(name: str, value: IntOrPair, minimum: int) -> Tuple[int, int]:
    pair = _pair(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= minimum for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints >= {minimum}, got {value!r}")
    return tuple(pair)


def _check_tensor(name: str, t: torch.Tensor, dim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D {layout}, got shape {tuple(t.shape)}")


def _check_groups(c_in: int, c_out: int, groups: int, dg: int) -> None:
    for name, value in (("groups", groups), ("deformable_groups", dg)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if c_in % groups != 0 or c_out % groups != 0:
        raise ValueError(
            f"in_channels ({c_in}) and out_channels ({c_out}) must both be divisible by "
            f"groups ({groups})"
        )
    if c_in % dg != 0:
        raise ValueError(f"in_channels ({c_in}) must be divisible by deformable_groups ({dg})")


def _check_args(input, offset, mask, weight, bias, stride, padding, dilation, groups, dg):
    """Validate shapes; return the output spatial size (Ho, Wo)."""
    _check_tensor("input", input, 4, "(N, C_in, H, W)")
    _check_tensor("weight", weight, 4, "(C_out, C_in // groups, kh, kw)")
    _check_tensor("offset", offset, 4, "(N, 2 * deformable_groups * kh * kw, Ho, Wo)")
    if mask is not None:
        _check_tensor("mask", mask, 4, "(N, deformable_groups * kh * kw, Ho, Wo)")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {input.dtype}")
    n, c_in, h, w = input.shape
    c_out, c_per_group, kh, kw = weight.shape
    _check_groups(c_in, c_out, groups, dg)
    if c_per_group * groups != c_in:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}, expected (C_out, {c_in // groups}, kh, kw) "
            f"for input with {c_in} channels and groups={groups}"
        )
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if ho < 1 or wo < 1:
        raise ValueError(
            f"input of spatial size {(h, w)} is too small for kernel {(kh, kw)} with "
            f"padding {padding}, dilation {dilation} and stride {stride}: output would be "
            f"{(ho, wo)}"
        )
    for name, t, per_tap in (("offset", offset, 2), ("mask", mask, 1)):
        expected = (n, per_tap * dg * kh * kw, ho, wo)
        if t is not None and tuple(t.shape) != expected:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected {expected} with "
                f"deformable_groups={dg} and kernel {(kh, kw)}"
            )
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({c_out},)")
    for name, t in (("offset", offset), ("mask", mask), ("weight", weight), ("bias", bias)):
        if t is not None and t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    return ho, wo


def modulated_deform_conv(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    deformable_groups: int = 1,
    backend: str = "auto",
    *,
    native_impl: str = "auto",
) -> torch.Tensor:
    """Modulated deformable convolution (DCNv2); with ``mask=None``, DCNv1.

    Args:
        input (Tensor): (N, C_in, H, W).
        offset (Tensor): (N, 2*G*kh*kw, Ho, Wo), G = ``deformable_groups``; channel
            ``g*2*kh*kw + 2*k`` is dy and ``+1`` is dx of kernel tap ``k = i*kw + j``.
        mask (Tensor or None): (N, G*kh*kw, Ho, Wo), modulation of each tap.
        weight (Tensor): (C_out, C_in // groups, kh, kw).
        bias (Tensor or None): (C_out,).
        backend (str): "auto", "detectron2", "native" or "torchvision".
        native_impl (str): kernels of the "native" backend: "auto", "cpp" or "torch".

    Returns:
        Tensor: (N, C_out, Ho, Wo) in the promoted floating dtype (half precision computed in
        float32, rounded once); float32 under autocast.
    """
    stride = _as_pair("stride", stride, 1)
    padding = _as_pair("padding", padding, 0)
    dilation = _as_pair("dilation", dilation, 1)
    ho, wo = _check_args(
        input, offset, mask, weight, bias, stride, padding, dilation, groups, deformable_groups
    )
    dtype = _result_dtype(input, offset, mask, weight, bias)
    device_type = input.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:
        dtype = torch.float32
    if input.shape[0] == 0:
        # Empty batch: an output still connected to every input, so backward gives zeros.
        out = input.new_zeros((0, weight.shape[0], ho, wo), dtype=dtype)
        for t in (input, offset, mask, weight, bias):
            if t is not None and t.is_floating_point():
                out = out + t.sum().to(dtype) * 0
        return out
    fn = functools.partial(
        _run, resolve_backend(backend, input.device), resolve_native_impl(native_impl)
    )
    # Half precision runs in float32: float16 sampling coordinates are off by up to a pixel on
    # large maps, and some kernels have no bfloat16 version.
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    tensors = (input, offset, mask, weight, bias)
    if autocast or any(t is not None and t.dtype != compute for t in tensors):
        with torch.autocast(device_type=device_type, enabled=False):
            args = [t.to(compute) if t is not None else None for t in tensors]
            out = fn(*args, stride, padding, dilation, groups, deformable_groups)
        return out.to(dtype)
    return fn(*tensors, stride, padding, dilation, groups, deformable_groups)


def _run(backend, native_impl, input, offset, mask, weight, bias, *geometry):
    """Run ``backend`` inside the custom operator ``torch.ops.dcnv2.deform_conv2d``, except
    detectron2's (its backward needs autograd) and torchvision's under ``torch.jit.trace`` (a
    traced file then loads with torchvision alone)."""
    tracing = torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export()
    if backend == "detectron2" or (backend == "torchvision" and tracing):
        return BACKENDS[backend](input, offset, mask, weight, bias, *geometry, native_impl)
    return ops.deform_conv2d(input, offset, mask, weight, bias, *geometry, backend, native_impl)


def _result_dtype(input, offset, mask, weight, bias) -> torch.dtype:
    """The floating dtype of the result: input's, promoted with the other floating tensors'."""
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    for name, t in (("offset", offset), ("mask", mask)):
        if t is not None and t.is_complex():
            raise TypeError(
                f"{name} must be a real (floating, integer or bool) tensor, got {t.dtype}"
            )
    dtype = input.dtype
    for t in (offset, mask, weight, bias):
        if t is not None and t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def deform_conv(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    deformable_groups: int = 1,
    backend: str = "auto",
    *,
    native_impl: str = "auto",
) -> torch.Tensor:
    """Deformable convolution (DCNv1) with detectron2's ``deform_conv`` signature."""
    return modulated_deform_conv(
        input, offset, None, weight, None, stride, padding, dilation, groups, deformable_groups,
        backend, native_impl=native_impl,
    )  # fmt: skip


class _DeformConvBase(nn.Module):
    # ``bias=None`` takes detectron2's default: True for ModulatedDeformConv, False for DeformConv.
    default_bias: bool

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        deformable_groups: int = 1,
        bias: Optional[bool] = None,
        norm: Optional[nn.Module] = None,
        activation=None,
        backend: str = "auto",
        *,
        native_impl: str = "auto",
    ):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        _check_groups(in_channels, out_channels, groups, deformable_groups)
        bias = self.default_bias if bias is None else bias
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _as_pair("kernel_size", kernel_size, 1)
        self.stride = _as_pair("stride", stride, 1)
        self.padding = _as_pair("padding", padding, 0)
        self.dilation = _as_pair("dilation", dilation, 1)
        self.groups = groups
        self.deformable_groups = deformable_groups
        self.with_bias = bias
        self.norm = norm
        self.activation = activation
        self.backend = backend
        self.native_impl = native_impl
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    @property
    def offset_channels(self) -> int:
        """Channels of the offset tensor this layer expects: 2 * G * kh * kw."""
        return 2 * self.deformable_groups * self.kernel_size[0] * self.kernel_size[1]

    def _forward(self, x, offset, mask):
        x = modulated_deform_conv(
            x, offset, mask, self.weight, self.bias, self.stride, self.padding, self.dilation,
            self.groups, self.deformable_groups, self.backend, native_impl=self.native_impl,
        )  # fmt: skip
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, groups={self.groups}, "
            f"deformable_groups={self.deformable_groups}, bias={self.with_bias}, "
            f"backend={self.backend!r}"
            + (f", native_impl={self.native_impl!r}" if self.native_impl != "auto" else "")
        )


class ModulatedDeformConv(_DeformConvBase):
    """Modulated deformable convolution (DCNv2), detectron2's constructor plus ``backend``.

    ``forward(x, offset, mask)``: offset (N, 2*G*kh*kw, Ho, Wo), mask (N, G*kh*kw, Ho, Wo).
    """

    default_bias = True

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._forward(x, offset, mask)


class DeformConv(_DeformConvBase):
    """Deformable convolution (DCNv1), detectron2's constructor plus ``backend``."""

    default_bias = False

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return self._forward(x, offset, None)
