"""Deformable convolution layers with selectable backends (see :mod:`dcnv2.layers.backends`)."""

from .backends import available_backends
from .deform_conv import DeformConv, ModulatedDeformConv, deform_conv, modulated_deform_conv
from .mdpool import ModulatedDeformRoIAlign, deform_roi_align

__all__ = [
    "available_backends",
    "DeformConv",
    "ModulatedDeformConv",
    "deform_conv",
    "modulated_deform_conv",
    "ModulatedDeformRoIAlign",
    "deform_roi_align",
]
