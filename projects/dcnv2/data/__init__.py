"""Datasets: importing this module registers the synthetic COCO-format datasets."""

from . import synthetic  # noqa: F401  (registers dcnv2_synthetic_{train,val}; generates nothing)
from .coco import DatasetNotFoundError, check_datasets
from .transforms import build_test_augmentation, build_train_augmentation

__all__ = [
    "DatasetNotFoundError",
    "build_test_augmentation",
    "build_train_augmentation",
    "check_datasets",
]
