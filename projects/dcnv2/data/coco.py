"""The datasets named in the config: the user's COCO-format ones registered, all checked on disk.

``DATASETS.DCNV2.COCO`` or ``dataloader.coco_datasets``: ``(name, json_file, image_root)`` triples.
"""

import json
import os
from collections.abc import Sequence
from typing import Any, Iterable, List, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from ..config import cfg_get, run_keys
from ..errors import AnnotationError, ConfigError, DCNv2Error

__all__ = [
    "DatasetNotFoundError",
    "check_datasets",
    "load_category_metadata",
    "parse_coco_datasets",
    "register_coco_datasets",
    "register_config_datasets",
]

_EXPECTED = "expected (name, json_file, image_root) triples, e.g. (('my', 'a.json', 'images/'),)"


def parse_coco_datasets(
    entries: Any, key: str = "DATASETS.DCNV2.COCO"
) -> List[Tuple[str, str, str]]:
    """The ``(name, json_file, image_root)`` triples of config key ``key``, paths made absolute."""
    if entries is None:
        return []
    if not _is_sequence(entries):
        raise ConfigError(f"{key} is {entries!r}; {_EXPECTED}")
    out = []
    for entry in entries:
        shown = repr(tuple(entry)) if _is_sequence(entry) else repr(entry)
        if not _is_sequence(entry) or len(entry) != 3:
            raise ConfigError(
                f"{key} has {shown}; {_EXPECTED} (a single dataset needs the trailing comma)"
            )
        if not all(isinstance(v, str) and v for v in entry):
            raise ConfigError(f"{key} has {shown}; expected three non-empty strings")
        name, json_file, image_root = entry
        if name in [n for n, _, _ in out]:
            raise ConfigError(f"{key} names dataset {name!r} twice")
        for path, what, exists, expected in (
            (json_file, "annotation file", os.path.isfile, "a COCO instances json"),
            (image_root, "image folder", os.path.isdir, "the folder of its images"),
        ):
            if not exists(path):
                raise ConfigError(
                    f"{key}: the {what} of {name!r}, {os.path.abspath(path)}, does not exist; "
                    f"expected {expected}"
                )
        out.append((name, os.path.abspath(json_file), os.path.abspath(image_root)))
    return out


def register_coco_datasets(entries: Any, key: str = "DATASETS.DCNV2.COCO") -> List[str]:
    """Register each triple with ``register_coco_instances`` unless already registered."""
    triples = parse_coco_datasets(entries, key)
    for name, json_file, image_root in triples:
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            same = (meta.get("json_file", None), meta.get("image_root", None))
            if same == (json_file, image_root):
                continue
            raise ConfigError(
                f"{key}: dataset name {name!r} is already registered with other files "
                f"(json_file {same[0]}, image_root {same[1]}); choose another name"
            )
        register_coco_instances(name, {}, json_file, image_root)
    return [name for name, _, _ in triples]


def register_config_datasets(cfg) -> List[str]:
    """:func:`register_coco_datasets` for the datasets a YAML config or LazyConfig names."""
    keys = run_keys(cfg)
    return register_coco_datasets(cfg_get(cfg, keys.coco_datasets, ()), keys.coco_datasets)


def load_category_metadata(name: str):
    """The metadata of ``name`` with ``thing_dataset_id_to_contiguous_id`` read from its json."""
    meta = MetadataCatalog.get(name)
    if meta.get("thing_dataset_id_to_contiguous_id", None) or name not in DatasetCatalog.list():
        return meta
    if meta.get("prepare", None) is not None:  # a dataset this project generates
        meta.prepare()
    json_file = meta.get("json_file", None)
    if not json_file or not os.path.isfile(json_file):
        return meta
    try:
        with open(json_file) as f:
            categories = sorted((int(c["id"]), str(c["name"])) for c in json.load(f)["categories"])
    except (ValueError, KeyError, TypeError) as e:
        raise AnnotationError(
            f"Dataset {name!r}: {json_file} has no valid 'categories' list ({e!r}); expected "
            "[{'id': ..., 'name': ...}, ...] as in COCO"
        ) from None
    meta.thing_dataset_id_to_contiguous_id = {cid: i for i, (cid, _) in enumerate(categories)}
    if meta.get("thing_classes", None) is None:
        meta.thing_classes = [name for _, name in categories]
    return meta


def _is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


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
        if meta.get("prepare", None) is not None:  # a dataset this project generates
            meta.prepare()
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
