"""Weights: safe checkpoint loading and converters from MMDetection and torchvision."""

from .checkpointer import (
    DCNv2Checkpointer,
    build_checkpointer,
    dcnv2_checkpointer_in_d2_defaults,
)
from .loading import UnsafeCheckpointError, load_checkpoint_file

__all__ = [
    "DCNv2Checkpointer",
    "UnsafeCheckpointError",
    "build_checkpointer",
    "dcnv2_checkpointer_in_d2_defaults",
    "load_checkpoint_file",
]
