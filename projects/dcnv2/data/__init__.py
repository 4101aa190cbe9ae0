"""Datasets: importing this module registers the synthetic COCO-format datasets."""

from .checks import DatasetNotFoundError, check_datasets

__all__ = ["DatasetNotFoundError", "check_datasets"]
