"""Datasets: importing this module registers the synthetic COCO-format datasets."""

from . import synthetic  # noqa: F401  (registers dcnv2_synthetic_{train,val}; generates nothing)
from .checks import DatasetNotFoundError, check_datasets

__all__ = ["DatasetNotFoundError", "check_datasets"]
