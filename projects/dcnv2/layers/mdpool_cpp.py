"""Compiled CPU kernels of modulated deformable RoI pooling (``csrc/mdpool_cpu.cpp``).

Built like :mod:`dcnv2.layers.native_cpp`: JIT-compiled with
:func:`torch.utils.cpp_extension.load` on first use (a few seconds on two cores), cached by torch
under ``TORCH_EXTENSIONS_DIR``; a failed build is one warning, after which
:func:`dcnv2.layers.mdpool.deform_roi_align` uses its PyTorch-op implementation.
``DCNV2_NATIVE_IMPL=torch`` skips the build, as for the deformable convolution.

CPU float32/float64 only; features (N, C, H, W), RoIs (R, 5) and offsets (R, 2, Ph, Pw) all of
one dtype and contiguous.
"""

import functools
import logging
import os
from typing import Optional, Tuple

import torch

__all__ = ["is_available", "error", "forward", "backward"]

logger = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "mdpool_cpu.cpp")
_error: Optional[str] = None


@functools.lru_cache(maxsize=None)
def _load() -> bool:
    global _error
    try:
        from torch.utils.cpp_extension import load

        # at::parallel_for is OpenMP in torch's CPU builds: without -fopenmp it runs serially.
        load(
            name="dcnv2_mdpool_cpu",
            sources=[_SOURCE],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        torch.ops.dcnv2_mdpool.forward  # noqa: B018 - raises if the library did not register
    except Exception as e:  # any build or load failure: the PyTorch-op implementation still works
        _error = f"{type(e).__name__}: {e}"
        return False
    return True


@functools.lru_cache(maxsize=None)
def _warn_once() -> None:
    logger.warning(
        "dcnv2: could not build the compiled mdpool kernels (%s); using the slower PyTorch-op "
        "implementation instead",
        _error,
    )


def is_available(warn: bool = True) -> bool:
    """Whether the compiled kernels load (building them on the first call)."""
    ok = _load()
    if not ok and warn:
        _warn_once()
    return ok


def error() -> Optional[str]:
    """Why the build failed, or None."""
    _load()
    return _error


def forward(features, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, aligned):
    """(R, C, Ph, Pw) pooled features; arguments as ``deform_roi_align``'s, validated."""
    return torch.ops.dcnv2_mdpool.forward(
        features, rois, offset, *output_size, spatial_scale, sampling_ratio, gamma, aligned
    )


def backward(
    grad_out, features, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, aligned,
    need_features, need_offset,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:  # fmt: skip
    """Gradients for the features and the offsets, None where not asked for."""
    grad_features, grad_offset = torch.ops.dcnv2_mdpool.backward(
        grad_out.contiguous(), features, rois, offset, *output_size, spatial_scale,
        sampling_ratio, gamma, aligned, need_features, need_offset,
    )  # fmt: skip
    return (
        grad_features if need_features else None,
        grad_offset if need_offset and offset is not None else None,
    )
