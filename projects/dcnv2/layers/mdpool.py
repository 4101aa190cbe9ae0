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


def _check_inputs(features: Tensor, rois: Tensor, offset: Optional[Tensor], size) -> None:
    if features.dim() != 4 or not features.is_floating_point():
        raise ValueError(
            f"features must be a floating-point (N, C, H, W) tensor, got {features.dtype} "
            f"of shape {tuple(features.shape)}"
        )
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"output_size must be a positive int or pair, got {tuple(size)}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(
            f"rois must be (R, 5) rows of (batch index, x0, y0, x1, y1), got {tuple(rois.shape)}"
        )
    if offset is not None and tuple(offset.shape) != (rois.shape[0], 2, size[0], size[1]):
        raise ValueError(
            f"offset must be (R, 2, {size[0]}, {size[1]}) = (RoIs, (dx, dy), bins), got "
            f"{tuple(offset.shape)} for {rois.shape[0]} RoIs"
        )


def _grid_size(extent: Tensor, bins: int, sampling_ratio: int) -> Tensor:
    """Samples per bin side: fixed, or RoIAlign's adaptive ``ceil(extent / bins)``."""
    if sampling_ratio > 0:
        return torch.full_like(extent, sampling_ratio, dtype=torch.int64)
    return torch.ceil(extent / bins).to(torch.int64)


def _bilinear_bin_average(feature: Tensor, ys: Tensor, xs: Tensor, sh: int, sw: int) -> Tensor:
    """Mean of RoIAlign-style bilinear samples of one image.

    Args:
        feature (Tensor): (1, C, H, W).
        ys, xs (Tensor): (K, sh * sw) sample coordinates in pixels (pixel centres at integers).

    Returns:
        Tensor: (C, K), the mean over the ``sh * sw`` samples of each of the K bins.
    """
    h, w = feature.shape[-2:]
    valid = (ys >= -1.0) & (ys <= h) & (xs >= -1.0) & (xs <= w)
    # align_corners=True maps -1/+1 to the first/last pixel centre; max(., 1) keeps a one-pixel
    # map finite (grid_sample then reads pixel 0 whatever the coordinate).
    grid = torch.stack((xs * (2.0 / max(w - 1, 1)) - 1.0, ys * (2.0 / max(h - 1, 1)) - 1.0), -1)
    samples = F.grid_sample(
        feature, grid[None], mode="bilinear", padding_mode="border", align_corners=True
    )[0]
    return (samples * valid).sum(-1) / (sh * sw)


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
    ph, pw = _pair(output_size)
    _check_inputs(features, rois, offset, (ph, pw))
    args = ((ph, pw), float(spatial_scale), int(sampling_ratio), float(gamma), bool(aligned))
    if _use_kernels(features, rois, impl):
        ctype = features.dtype
        offset = None if offset is None else offset.to(ctype)
        return _DeformRoIAlign.apply(features, rois.detach().to(ctype), offset, *args)
    return _deform_roi_align_torch(features, rois, offset, *args)


def _use_kernels(features: Tensor, rois: Tensor, impl: str) -> bool:
    """Whether ``impl`` means the compiled kernels for these inputs (see deform_roi_align)."""
    from .backends import resolve_native_impl

    if impl not in IMPLS:
        raise ValueError(f"Unknown mdpool implementation {impl!r}; expected one of {IMPLS}")
    impl = resolve_native_impl(impl)
    if impl == "torch":
        return False
    applies = (
        features.device.type == "cpu"
        and features.dtype in (torch.float32, torch.float64)
        and not (rois.requires_grad and torch.is_grad_enabled())
    )
    if impl == "auto" and (not applies or torch.jit.is_tracing()):
        return False
    from . import mdpool_cpp

    if impl == "cpp":
        if not applies:
            raise ValueError(
                "The compiled mdpool kernels support CPU float32/float64 features and RoIs "
                f"without gradient, got {features.dtype} on {features.device}"
                f"{' with RoI gradient' if rois.requires_grad else ''}; use impl='torch'"
            )
        if not mdpool_cpp.is_available(warn=False):
            raise RuntimeError(f"The compiled mdpool kernels failed to build: {mdpool_cpp.error()}")
        return True
    return mdpool_cpp.is_available()


class _DeformRoIAlign(torch.autograd.Function):
    """The compiled kernels with their backward; gradients for the features and offsets."""

    @staticmethod
    def forward(ctx, features, rois, offset, output_size, scale, sampling_ratio, gamma, aligned):
        from . import mdpool_cpp

        features = features.contiguous()
        offset = None if offset is None else offset.contiguous()
        ctx.args = (output_size, scale, sampling_ratio, gamma, aligned)
        ctx.save_for_backward(features, rois, offset)
        return mdpool_cpp.forward(features, rois.contiguous(), offset, *ctx.args)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        from . import mdpool_cpp

        features, rois, offset = ctx.saved_tensors
        need_features, _, need_offset = ctx.needs_input_grad[:3]
        grad_features, grad_offset = mdpool_cpp.backward(
            grad_out, features, rois.contiguous(), offset, *ctx.args, need_features, need_offset
        )
        return grad_features, None, grad_offset, None, None, None, None, None


def _deform_roi_align_torch(
    features: Tensor,
    rois: Tensor,
    offset: Optional[Tensor],
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
    aligned: bool,
) -> Tensor:
    """``deform_roi_align`` in PyTorch ops, one ``grid_sample`` per (image, sample grid) group."""
    ph, pw = output_size
    num_rois, channels = rois.shape[0], features.shape[1]
    ctype = torch.promote_types(features.dtype, torch.float32)
    # Channels-last keeps the channels of a sample position contiguous for grid_sample.
    feats = features.to(ctype).contiguous(memory_format=torch.channels_last)
    boxes = rois[:, 1:].to(ctype) * spatial_scale - (0.5 if aligned else 0.0)
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    if not aligned:
        width, height = width.clamp(min=1.0), height.clamp(min=1.0)
    bin_w, bin_h = width / pw, height / ph
    cols = torch.arange(pw, dtype=ctype, device=rois.device)
    rows = torch.arange(ph, dtype=ctype, device=rois.device)
    x0 = (boxes[:, 0, None] + cols * bin_w[:, None])[:, None, :].expand(-1, ph, -1)
    y0 = (boxes[:, 1, None] + rows * bin_h[:, None])[:, :, None].expand(-1, -1, pw)
    if offset is not None:
        offset = offset.to(ctype)
        x0 = x0 + gamma * width[:, None, None] * offset[:, 0]
        y0 = y0 + gamma * height[:, None, None] * offset[:, 1]

    grid_h = _grid_size(height, ph, sampling_ratio)
    grid_w = _grid_size(width, pw, sampling_ratio)
    batch = rois[:, 0].to(torch.int64)
    # One group per (image, sy, sx); RoIs with an empty grid (degenerate boxes) stay 0 as in
    # RoIAlign. The key is unique because grid sizes are small non-negative ints.
    bound = max(int(torch.max(grid_h.max(), grid_w.max())), 0) + 1 if num_rois else 1
    key = (batch * bound + grid_h.clamp(min=0)) * bound + grid_w.clamp(min=0)
    pieces, indices = [], []
    for k in torch.unique(key).tolist():
        b, sh, sw = k // (bound * bound), (k // bound) % bound, k % bound
        if sh == 0 or sw == 0:
            continue
        idx = torch.nonzero(key == k).squeeze(1)
        iy = torch.arange(sh, dtype=ctype, device=rois.device) + 0.5
        ix = torch.arange(sw, dtype=ctype, device=rois.device) + 0.5
        ys = y0[idx][..., None, None] + iy[:, None] * bin_h[idx, None, None, None, None] / sh
        xs = x0[idx][..., None, None] + ix * bin_w[idx, None, None, None, None] / sw
        shape = (idx.numel() * ph * pw, sh * sw)
        ys = ys.expand(-1, -1, -1, sh, sw).reshape(shape)
        xs = xs.expand(-1, -1, -1, sh, sw).reshape(shape)
        pooled = _bilinear_bin_average(feats[b : b + 1], ys, xs, sh, sw)
        pieces.append(pooled.view(channels, idx.numel(), ph, pw).transpose(0, 1))
        indices.append(idx)
    out = features.new_zeros((num_rois, channels, ph, pw), dtype=ctype)
    if pieces:
        out = out.index_copy(0, torch.cat(indices), torch.cat(pieces))
    return out.to(features.dtype)


def _fc_branch(in_dim: int, hidden_dim: int, num_hidden: int, out_dim: int) -> nn.Sequential:
    """``num_hidden`` x (Linear + ReLU), then a zero-initialised Linear to ``out_dim``."""
    layers = []
    for i in range(num_hidden):
        layers += [nn.Linear(in_dim if i == 0 else hidden_dim, hidden_dim), nn.ReLU(inplace=True)]
    last = nn.Linear(hidden_dim if num_hidden else in_dim, out_dim)
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
        if len(self.output_size) != 2 or min(self.output_size) < 1:
            raise ValueError(f"output_size must be a positive int or pair, got {output_size!r}")
        for name, value in (("in_channels", in_channels), ("fc_dim", fc_dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, value in (("num_offset_fc", num_offset_fc), ("num_mask_fc", num_mask_fc)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
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
        if _use_kernels(features, rois, "auto"):
            # The compiled kernels without offsets are this RoIAlign, with a parallel backward
            # (torchvision's CPU backward is serial).
            x = deform_roi_align(
                features, rois, None, output_size=self.output_size, spatial_scale=spatial_scale,
                sampling_ratio=self.sampling_ratio, aligned=self.aligned, impl="cpp",
            )  # fmt: skip
        else:
            x = roi_align(
                features,
                rois.to(features.dtype),
                self.output_size,
                spatial_scale,
                self.sampling_ratio,
                self.aligned,
            )
        x = x.flatten(1)
        ph, pw = self.output_size
        return self.offset_fc(x).view(-1, 2, ph, pw), self.mask_fc(x).view(-1, 1, ph, pw)

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
            features,
            rois,
            offset,
            output_size=self.output_size,
            spatial_scale=scale,
            sampling_ratio=self.sampling_ratio,
            gamma=self.gamma,
            aligned=self.aligned,
        )
        out = pooled * mask
        if rois.shape[0] == 0:
            # DDP expects a gradient for every parameter, also when a level received no RoI.
            out = out + offset.sum() * 0
        return out.to(features.dtype)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, in_channels={self.in_channels}, "
            f"spatial_scale={self.spatial_scale}, sampling_ratio={self.sampling_ratio}, "
            f"gamma={self.gamma}, aligned={self.aligned}"
        )
