"""Compiled CPU kernels of modulated deformable RoI pooling (``csrc/mdpool_cpu.cpp``).

Built on first use into ``torch.ops.dcnv2_mdpool``; without them
:func:`.mdpool.deform_roi_align` uses PyTorch ops.
"""

import logging
import os
from typing import Optional

from .extension import JitExtension

__all__ = ["is_available", "error"]

_EXTENSION = JitExtension(
    name="dcnv2_mdpool_cpu",
    sources=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "mdpool_cpu.cpp")],
    probe="dcnv2_mdpool.forward",
    what="mdpool kernels",
    fallback="PyTorch-op implementation",
    logger=logging.getLogger(__name__),
)


def is_available(warn: bool = True) -> bool:
    """Whether the compiled kernels load (building them on the first call)."""
    return _EXTENSION.is_available(warn)


def error() -> Optional[str]:
    """Why the build failed, or None."""
    return _EXTENSION.error()
