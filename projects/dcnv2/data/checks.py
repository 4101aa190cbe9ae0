"""Check that the datasets a config names are on disk, before any model is built."""

import os
from typing import Iterable

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..errors import DCNv2Error

__all__ = ["DatasetNotFoundError", "check_datasets"]

_COCO_LAYOUT = """expected layout (detectron2's builtin COCO):
  $DETECTRON2_DATASETS/coco/annotations/instances_{{train,val}}2017.json
  $DETECTRON2_DATASETS/coco/{{train,val}}2017/*.jpg
DETECTRON2_DATASETS is {root!r} here{note}. Point it at the folder that holds coco/ (or link
your COCO 2017 folder there: ln -s /path/to/coco2017 $DETECTRON2_DATASETS/coco)."""


class DatasetNotFoundError(DCNv2Error, FileNotFoundError):
    """A dataset named by the config is not on disk where detectron2 looks for it."""


def check_datasets(dataset_names: Iterable[str]) -> None:
    """Make sure every named dataset can be loaded; generate the synthetic ones if needed."""
    for name in dataset_names:
        if name not in DatasetCatalog.list():
            raise DatasetNotFoundError(
                f"Dataset {name!r} is not registered. Name your COCO-format data in the config "
                f"(DATASETS.DCNV2.COCO ((name, json_file, image_root),) or a LazyConfig's "
                f"dataloader.coco_datasets), or use one of the builtin names such as "
                f"'coco_2017_train'."
            )
        meta = MetadataCatalog.get(name)
        prepare = meta.get("prepare", None)
        if prepare is not None:  # datasets this project generates itself
            prepare()
        for key in ("json_file", "image_root"):
            path = meta.get(key, None)
            if path is None or os.path.exists(path):
                continue
            root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
            note = "" if "DETECTRON2_DATASETS" in os.environ else " (the variable is unset)"
            what = "annotation file" if key == "json_file" else "image folder"
            raise DatasetNotFoundError(
                f"Dataset {name!r}: {what} not found at {os.path.abspath(path)}\n"
                + _COCO_LAYOUT.format(root=os.path.abspath(root), note=note)
            )
