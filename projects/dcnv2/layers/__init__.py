"""Deformable convolution layers with selectable backends (see :mod:`dcnv2.layers.backends`)."""

from .backends import available_backends
from .deform_conv import DeformConv, ModulatedDeformConv, deform_conv, modulated_deform_conv

__all__ = [
    "available_backends",
    "DeformConv",
    "ModulatedDeformConv",
    "deform_conv",
    "modulated_deform_conv",
]
