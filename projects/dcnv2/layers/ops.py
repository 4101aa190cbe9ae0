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
    return backends.BACKENDS[backend](
        input, offset, mask, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups,
        deformable_groups, native_impl,
    )  # fmt: skip


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
    grads = backends.BACKWARDS[backend](
        grad_out, input, offset, mask, weight, tuple(stride), tuple(padding), tuple(dilation),
        groups, deformable_groups, list(needs), native_impl,
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
    ctx.save_for_backward(*inputs[:4])  # input, offset, mask, weight
    ctx.conf = inputs[5:]


def _backward(ctx, grad_out):
    # needs_input_grad is False for a None mask or bias.
    needs = list(ctx.needs_input_grad[:5])
    grads = deform_conv2d_backward(
        grad_out, *ctx.saved_tensors, *ctx.conf[:5], needs, *ctx.conf[5:]
    )
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * 7


deform_conv2d.register_autograd(_backward, setup_context=_setup_context)
