"""``aligned=False`` (the legacy RoIAlign coordinates) in mdpool: no half-pixel shift and RoIs
at least one pixel wide and high, as torchvision's ``roi_align(..., aligned=False)``."""

import pytest
import torch
from torchvision.ops import roi_align

from dcnv2.layers import ModulatedDeformRoIAlign, deform_roi_align


def _inputs():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 20, 27, dtype=torch.float64, generator=g)
    rois = torch.tensor(
        [
            [0, 8.0, 12.0, 70.5, 53.0],
            [0, 30.3, 20.7, 31.1, 21.2],  # under one pixel of the map: clamped to 1 x 1
            [1, 5.0, 8.0, 40.0, 60.0],
            [1, 50.0, 30.0, 50.0, 70.0],  # zero width: clamped
        ],
        dtype=torch.float64,
    )
    return features, rois


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_zero_offsets_equal_torchvision_roialign(aligned, sampling_ratio):
    features, rois = _inputs()
    out = deform_roi_align(
        features, rois, torch.zeros(4, 2, 5, 5, dtype=torch.float64), output_size=5,
        spatial_scale=0.25, sampling_ratio=sampling_ratio, aligned=aligned,
    )  # fmt: skip
    reference = roi_align(features, rois, 5, 0.25, sampling_ratio, aligned)
    other = roi_align(features, rois, 5, 0.25, sampling_ratio, not aligned)
    assert (reference - other).abs().max() > 1e-3  # the two conventions differ here
    torch.testing.assert_close(out, reference, atol=1e-12, rtol=0)


def test_fresh_legacy_layer_is_half_legacy_roialign():
    features, rois = _inputs()
    layer = ModulatedDeformRoIAlign(
        output_size=5, in_channels=3, spatial_scale=0.25, fc_dim=8, aligned=False
    ).double()
    with torch.no_grad():
        out = layer(features, rois)
    torch.testing.assert_close(
        out, 0.5 * roi_align(features, rois, 5, 0.25, 0, False), atol=1e-12, rtol=0
    )
