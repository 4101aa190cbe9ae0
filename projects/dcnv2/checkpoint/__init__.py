"""Weights: safe checkpoint loading and converters from MMDetection and torchvision."""

from .checkpointer import DCNv2Checkpointer, build_checkpointer
from .loading import UnsafeCheckpointError, load_checkpoint_file

__all__ = [
    "DCNv2Checkpointer",
    "UnsafeCheckpointError",
    "build_checkpointer",
    "load_checkpoint_file",
]
