"""``ModulatedDeformRoIAlign`` with trained (non-zero) offset and modulation branches: each output
bin is RoIAlign over that bin moved by ``gamma`` times the predicted offset times the RoI's size
(applied once), times the predicted modulation. The reference pools every moved bin on its own
with torchvision's RoIAlign (a 1x1 output over the bin's box), independently of
``deform_roi_align``."""

import pytest
import torch
from torch import nn
from torchvision.ops import roi_align

from dcnv2.layers import ModulatedDeformRoIAlign

SIZE = (3, 4)  # (Ph, Pw): not square, so x and y cannot be swapped unnoticed


def _layer(gamma, sampling_ratio, aligned=True, channels=3, seed=0):
    torch.manual_seed(seed)
    layer = ModulatedDeformRoIAlign(
        output_size=SIZE, in_channels=channels, spatial_scale=0.25,
        sampling_ratio=sampling_ratio, gamma=gamma, fc_dim=8, aligned=aligned,
    ).double()  # fmt: skip
    # Trained branches: the last fcs (zero at init) get values giving offsets of order 1.
    for branch in (layer.offset_fc, layer.mask_fc):
        last = [m for m in branch if isinstance(m, nn.Linear)][-1]
        nn.init.normal_(last.weight, std=0.5)
        nn.init.normal_(last.bias, std=0.5)
    return layer


def _inputs():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 3, 30, 41, dtype=torch.float64, generator=g)
    rois = torch.tensor(
        [
            [0, 10.0, 12.0, 70.5, 53.0],
            [0, 30.3, 20.7, 150.2, 110.9],
            [1, 5.0, 8.0, 40.0, 100.0],
            [1, 60.0, 30.0, 160.0, 60.0],
        ],
        dtype=torch.float64,
    )
    return features, rois


def _reference(layer, features, rois):
    ph, pw = SIZE
    scale, ratio, aligned = layer.spatial_scale, layer.sampling_ratio, layer.aligned
    # Every bin here is over a pixel of the map: the legacy (aligned=False) clamp of a 1x1
    # pool's box to one pixel does not apply.
    x = roi_align(features, rois, SIZE, scale, ratio, aligned).flatten(1)
    offset = layer.offset_fc(x).view(-1, 2, ph, pw)
    mask = layer.mask_fc(x).view(-1, 1, ph, pw)
    # The box of every bin (image coordinates), moved by gamma * offset * RoI size.
    x0, y0, x1, y1 = rois[:, 1:].unbind(1)
    w, h = x1 - x0, y1 - y0
    j = torch.arange(pw, dtype=rois.dtype)[None, None, :]
    i = torch.arange(ph, dtype=rois.dtype)[None, :, None]
    bx0 = (
        x0[:, None, None]
        + j * (w / pw)[:, None, None]
        + layer.gamma * w[:, None, None] * offset[:, 0]
    )
    by0 = (
        y0[:, None, None]
        + i * (h / ph)[:, None, None]
        + layer.gamma * h[:, None, None] * offset[:, 1]
    )
    bx1, by1 = bx0 + (w / pw)[:, None, None], by0 + (h / ph)[:, None, None]
    batch = rois[:, 0, None, None].expand(-1, ph, pw)
    bins = torch.stack([batch, bx0, by0, bx1, by1], -1).reshape(-1, 5)
    # Adaptive sampling of a 1x1 pool over one bin = ceil(bin size), as over the whole RoI.
    pooled = roi_align(features, bins, 1, scale, ratio, aligned)
    pooled = pooled.view(len(rois), ph, pw, -1).permute(0, 3, 1, 2)
    return pooled * mask, offset, mask


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("gamma,aligned", [(0.1, True), (0.3, True), (0.1, False)])
def test_output_is_the_modulated_roialign_of_bins_moved_once_by_gamma(
    gamma, aligned, sampling_ratio
):
    layer = _layer(gamma, sampling_ratio, aligned)
    features, rois = _inputs()
    with torch.no_grad():
        out = layer(features, rois)
        reference, offset, mask = _reference(layer, features, rois)
        unmoved = roi_align(features, rois, SIZE, 0.25, sampling_ratio, aligned) * mask
    # The branches are far from their initial zero offsets and 0.5 modulation.
    assert offset.abs().mean() > 0.3 and (mask - 0.5).abs().mean() > 0.05
    assert (out - unmoved).abs().max() > 0.05  # the offsets move the bins visibly
    assert out.shape == (4, 3) + SIZE
    torch.testing.assert_close(out, reference, atol=1e-10, rtol=0)


def test_spatial_scale_argument_overrides_the_layers_own():
    layer = _layer(0.1, 2)
    features, rois = _inputs()
    with torch.no_grad():
        out = layer(torch.nn.functional.avg_pool2d(features, 2), rois, spatial_scale=0.125)
        layer.spatial_scale = 0.125
        reference, _, _ = _reference(layer, torch.nn.functional.avg_pool2d(features, 2), rois)
    torch.testing.assert_close(out, reference, atol=1e-10, rtol=0)
