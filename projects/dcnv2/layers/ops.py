"""The deformable convolution as custom operators ``torch.ops.dcnv2.deform_conv2d`` and
``deform_conv2d_backward``, so ``torch.compile`` and ``torch.export`` see one node.
"""

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import backends

__all__ = ["deform_conv2d", "deform_conv2d_backward"]


@torch.library.custom_op("dcnv2::deform_conv2d", mutates_args=())
def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    mask: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    deformable_groups: int,
    backend: str,
    native_impl: str,
) -> Tensor:
    geometry = (tuple(stride), tuple(padding), tuple(dilation))
    fn = backends.BACKENDS[backend]
    return fn(input, offset, mask, weight, bias, *geometry, groups, deformable_groups, native_impl)


@deform_conv2d.register_fake
def _deform_conv2d_fake(
    input, offset, mask, weight, bias, stride, padding, dilation, groups, dg, backend, native_impl
):
    return input.new_empty((input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3]))


@torch.library.custom_op("dcnv2::deform_conv2d_backward", mutates_args=())
def deform_conv2d_backward(
    grad_out: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Optional[Tensor],
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    deformable_groups: int,
    needs: Sequence[bool],
    backend: str,
    native_impl: str,
) -> List[Tensor]:
    geometry = (tuple(stride), tuple(padding), tuple(dilation))
    grads = backends.BACKWARDS[backend](
        grad_out, input, offset, mask, weight, *geometry, groups, deformable_groups,
        list(needs), native_impl,
    )  # fmt: skip
    return [input.new_empty(0) if g is None else g for g in grads]


@deform_conv2d_backward.register_fake
def _deform_conv2d_backward_fake(
    grad_out, input, offset, mask, weight, stride, padding, dilation, groups, dg, needs, *names
):
    like = (input, offset, mask, weight, grad_out.new_empty(weight.shape[0]))
    return [
        t.new_empty(t.shape) if need and t is not None else input.new_empty(0)
        for t, need in zip(like, needs)
    ]


def _setup_context(ctx, inputs, output):
    input, offset, mask, weight, bias = inputs[:5]
    ctx.save_for_backward(input, offset, mask, weight)
    ctx.conf = inputs[5:10]
    ctx.names = inputs[10:]
    ctx.present = (True, True, mask is not None, True, bias is not None)


def _backward(ctx, grad_out):
    input, offset, mask, weight = ctx.saved_tensors
    needs = [bool(n and p) for n, p in zip(ctx.needs_input_grad[:5], ctx.present)]
    grads = deform_conv2d_backward(
        grad_out, input, offset, mask, weight, *ctx.conf, needs, *ctx.names
    )
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * 7


deform_conv2d.register_autograd(_backward, setup_context=_setup_context)
