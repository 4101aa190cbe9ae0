"""Modulated deformable RoI pooling (mdpool, DCNv2 paper section 3.2): the op and the layer.

:func:`deform_roi_align` is RoIAlign with a learned shift per bin (mmcv's ``deform_roi_pool``);
:class:`ModulatedDeformRoIAlign` adds mmcv's offset and modulation fc branches.
"""

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair
from torchvision.ops import roi_align

__all__ = ["deform_roi_align", "ModulatedDeformRoIAlign", "IMPLS"]

IMPLS = ("auto", "cpp", "torch")


def deform_roi_align(
    features: Tensor,
    rois: Tensor,
    offset: Optional[Tensor] = None,
    *,
    output_size: Union[int, Sequence[int]],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
    aligned: bool = True,
    impl: str = "auto",
) -> Tensor:
    """RoIAlign with a learned shift per output bin (mmcv's ``deform_roi_pool``).

    Args:
        features (Tensor): (N, C, H, W) feature map.
        rois (Tensor): (R, 5), rows ``(batch index, x0, y0, x1, y1)`` in image coordinates.
        offset (Tensor or None): (R, 2, Ph, Pw) normalised bin offsets, x then y (mmcv's layout).
        sampling_ratio: samples per bin side; <= 0 for adaptive ``ceil(roi size / bins)``.
        gamma: scale of the normalised offsets (paper and mmcv: 0.1).
        aligned: ROIAlignV2 coordinates; False is the legacy RoIAlign.
        impl: "cpp", "torch" or "auto" (``DCNV2_NATIVE_IMPL``, else the kernels where they apply).

    Returns:
        Tensor: (R, C, Ph, Pw), in ``features.dtype``.
    """
    size = tuple(_pair(output_size))
    if features.dim() != 4 or not features.is_floating_point():
        raise ValueError(
            f"features must be float (N, C, H, W), got {features.dtype} {features.shape}"
        )
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"output_size must be a positive int or pair, got {size}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(
            f"rois must be (R, 5) rows (batch index, x0, y0, x1, y1), got {rois.shape}"
        )
    if offset is not None and offset.shape != (rois.shape[0], 2, *size):
        raise ValueError(f"offset must be (R, 2, {size[0]}, {size[1]}), got {tuple(offset.shape)}")
    args = (size, float(spatial_scale), int(sampling_ratio), float(gamma), bool(aligned))
    if _use_kernels(features, rois, impl):
        offset = None if offset is None else offset.to(features.dtype)
        return _DeformRoIAlign.apply(features, rois.detach().to(features.dtype), offset, *args)
    return _deform_roi_align_torch(features, rois, offset, *args)


def _use_kernels(features: Tensor, rois: Tensor, impl: str) -> bool:
    """Whether ``impl`` means the compiled kernels for these inputs (see deform_roi_align)."""
    from . import mdpool_cpp
    from .backends import resolve_native_impl

    if impl not in IMPLS:
        raise ValueError(f"Unknown mdpool implementation {impl!r}; expected one of {IMPLS}")
    impl = resolve_native_impl(impl)
    applies = (
        features.device.type == "cpu"
        and features.dtype in (torch.float32, torch.float64)
        and not (rois.requires_grad and torch.is_grad_enabled())
    )
    if impl == "auto":
        return applies and not torch.jit.is_tracing() and mdpool_cpp.is_available()
    if impl == "cpp" and not applies:
        raise ValueError(
            "The compiled mdpool kernels support CPU float32/float64 features and RoIs "
            f"without gradient, got {features.dtype} on {features.device}"
            f"{' with RoI gradient' if rois.requires_grad else ''}; use impl='torch'"
        )
    if impl == "cpp" and not mdpool_cpp.is_available(warn=False):
        raise RuntimeError(f"The compiled mdpool kernels failed to build: {mdpool_cpp.error()}")
    return impl == "cpp"


class _DeformRoIAlign(torch.autograd.Function):
    """The compiled kernels (``torch.ops.dcnv2_mdpool``): gradients for the features and offsets."""

    @staticmethod
    def forward(ctx, features, rois, offset, output_size, *args):
        features, rois = features.contiguous(), rois.contiguous()
        offset = None if offset is None else offset.contiguous()
        ctx.args = (*output_size, *args)
        ctx.save_for_backward(features, rois, offset)
        return torch.ops.dcnv2_mdpool.forward(features, rois, offset, *ctx.args)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        features, rois, offset = ctx.saved_tensors
        need_features, _, need_offset = ctx.needs_input_grad[:3]
        grad_features, grad_offset = torch.ops.dcnv2_mdpool.backward(
            grad_out.contiguous(), features, rois, offset, *ctx.args, need_features, need_offset
        )
        # Gradients not asked for come back empty and autograd drops them; a None offset gets None.
        return grad_features, None, grad_offset if need_offset else None, *[None] * 5


def _deform_roi_align_torch(
    features, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, aligned
) -> Tensor:
    """``deform_roi_align`` in PyTorch ops, one ``grid_sample`` per (image, sample grid) group."""
    ph, pw = output_size
    ctype = torch.promote_types(features.dtype, torch.float32)
    # Channels-last keeps the channels of a sample position contiguous for grid_sample.
    feats = features.to(ctype).contiguous(memory_format=torch.channels_last)
    height, width = feats.shape[-2:]
    boxes = rois[:, 1:].to(ctype) * spatial_scale - (0.5 if aligned else 0.0)
    roi_w, roi_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / pw, roi_h / ph
    cols = torch.arange(pw, dtype=ctype, device=rois.device)
    rows = torch.arange(ph, dtype=ctype, device=rois.device)
    x0 = (boxes[:, 0, None] + cols * bin_w[:, None])[:, None, :].expand(-1, ph, -1)
    y0 = (boxes[:, 1, None] + rows * bin_h[:, None])[:, :, None].expand(-1, -1, pw)
    if offset is not None:
        x0 = x0 + gamma * roi_w[:, None, None] * offset[:, 0].to(ctype)
        y0 = y0 + gamma * roi_h[:, None, None] * offset[:, 1].to(ctype)
    # Samples per bin side: fixed, or RoIAlign's adaptive ceil(bin size).
    if sampling_ratio > 0:
        grids = torch.full((len(rois), 2), sampling_ratio, device=rois.device)
    else:
        grids = torch.stack([bin_h, bin_w], 1).ceil().long()
    keys = torch.cat([rois[:, :1].long(), grids], 1)
    out = feats.new_zeros((len(rois), feats.shape[1], ph, pw))
    for key in torch.unique(keys, dim=0):
        b, sh, sw = key.tolist()
        if sh <= 0 or sw <= 0:
            continue  # a degenerate box pools to 0, as in RoIAlign
        idx = torch.nonzero((keys == key).all(1)).squeeze(1)
        iy = torch.arange(sh, dtype=ctype, device=rois.device) + 0.5
        ix = torch.arange(sw, dtype=ctype, device=rois.device) + 0.5
        ys = y0[idx][..., None, None] + iy[:, None] * bin_h[idx, None, None, None, None] / sh
        xs = x0[idx][..., None, None] + ix * bin_w[idx, None, None, None, None] / sw
        ys, xs = (t.reshape(-1, sh * sw) for t in torch.broadcast_tensors(ys, xs))
        valid = (ys >= -1.0) & (ys <= height) & (xs >= -1.0) & (xs <= width)
        # align_corners=True maps -1/+1 to the first/last pixel centre; max(., 1) keeps a
        # one-pixel map finite (grid_sample then reads pixel 0 whatever the coordinate).
        grid = torch.stack(
            (xs * (2.0 / max(width - 1, 1)) - 1, ys * (2.0 / max(height - 1, 1)) - 1), -1
        )
        samples = F.grid_sample(
            feats[b : b + 1], grid[None], mode="bilinear", padding_mode="border", align_corners=True
        )[0]
        pooled = (samples * valid).sum(-1) / (sh * sw)  # (C, len(idx) * ph * pw)
        out[idx] = pooled.view(-1, len(idx), ph, pw).transpose(0, 1)
    return out.to(features.dtype)


def _fc_branch(in_dim: int, hidden_dim: int, num_hidden: int, out_dim: int) -> nn.Sequential:
    """``num_hidden`` x (Linear + ReLU), then a zero-initialised Linear to ``out_dim``."""
    dims = [in_dim] + [hidden_dim] * num_hidden
    layers = [m for d in dims[:-1] for m in (nn.Linear(d, hidden_dim), nn.ReLU(inplace=True))]
    last = nn.Linear(dims[-1], out_dim)
    # Zero offsets and sigmoid(0) = 0.5 at the start: the layer begins as 0.5 x RoIAlign.
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


class ModulatedDeformRoIAlign(nn.Module):
    """Modulated deformable RoI pooling for one feature map (mmcv's ModulatedDeformRoIPoolPack).

    Output is ``deform_roi_align(features, rois, offset) * mask``; zero-initialised last fcs make a
    fresh layer return ``0.5 * RoIAlign``.
    """

    def __init__(
        self,
        *,
        output_size: Union[int, Sequence[int]],
        in_channels: int,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
        fc_dim: int = 1024,
        num_offset_fc: int = 2,
        num_mask_fc: int = 1,
        aligned: bool = True,
    ):
        """Args:
        output_size: ``(Ph, Pw)`` bins, or an int.
        gamma: scale of the predicted offsets, in units of the RoI's width/height.
        fc_dim: width of the hidden fcs of both branches (mmcv: 1024).
        num_offset_fc, num_mask_fc: hidden fcs of each branch (mmcv: 2 and 1).
        """
        super().__init__()
        self.output_size: Tuple[int, int] = tuple(_pair(output_size))
        self.in_channels = in_channels
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)
        self.aligned = aligned
        bins = self.output_size[0] * self.output_size[1]
        self.offset_fc = _fc_branch(in_channels * bins, fc_dim, num_offset_fc, 2 * bins)
        self.mask_fc = _fc_branch(in_channels * bins, fc_dim, num_mask_fc, bins)
        self.mask_fc.append(nn.Sigmoid())

    def predict(
        self, features: Tensor, rois: Tensor, spatial_scale: float
    ) -> Tuple[Tensor, Tensor]:
        """Offset (R, 2, Ph, Pw), x then y, and modulation (R, 1, Ph, Pw) from a plain RoIAlign."""
        size, ratio = self.output_size, self.sampling_ratio
        if _use_kernels(features, rois, "auto"):
            # The compiled kernels without offsets are this RoIAlign, with a parallel backward
            # (torchvision's CPU backward is serial).
            x = deform_roi_align(
                features, rois, output_size=size, spatial_scale=spatial_scale,
                sampling_ratio=ratio, aligned=self.aligned, impl="cpp",
            )  # fmt: skip
        else:
            x = roi_align(
                features, rois.to(features.dtype), size, spatial_scale, ratio, self.aligned
            )
        x = x.flatten(1)
        return self.offset_fc(x).view(-1, 2, *size), self.mask_fc(x).view(-1, 1, *size)

    def forward(
        self, features: Tensor, rois: Tensor, spatial_scale: Optional[float] = None
    ) -> Tensor:
        """Args:
            features (Tensor): (N, C, H, W).
            rois (Tensor): (R, 5), rows ``(batch index, x0, y0, x1, y1)`` in image coordinates.
            spatial_scale: overrides the layer's own (a layer shared by pyramid levels).

        Returns:
            Tensor: (R, C, Ph, Pw) in ``features.dtype``.
        """
        if features.dim() != 4 or features.shape[1] != self.in_channels:
            raise ValueError(
                f"expected (N, {self.in_channels}, H, W) features, got {tuple(features.shape)}"
            )
        scale = self.spatial_scale if spatial_scale is None else float(spatial_scale)
        offset, mask = self.predict(features, rois, scale)
        pooled = deform_roi_align(
            features, rois, offset, output_size=self.output_size, spatial_scale=scale,
            sampling_ratio=self.sampling_ratio, gamma=self.gamma, aligned=self.aligned,
        )  # fmt: skip
        # DDP expects a gradient for every parameter, also when a level received no RoI.
        out = pooled * mask if len(rois) else pooled * mask + offset.sum() * 0
        return out.to(features.dtype)

    def extra_repr(self) -> str:
        names = (
            "output_size",
            "in_channels",
            "spatial_scale",
            "sampling_ratio",
            "gamma",
            "aligned",
        )
        return ", ".join(f"{k}={getattr(self, k)}" for k in names)
