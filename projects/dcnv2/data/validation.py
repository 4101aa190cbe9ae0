"""Checks of COCO instances files, and one-line errors for any failure while a dataset is read.

``DATASETS.DCNV2.ON_BAD_DATA`` "fail" stops a run on a bad entry; "skip" (training sets only) drops
them with a warning. :func:`reading_dataset` names the dataset and json of a loader's failure.
"""

import contextlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..errors import AnnotationError, DCNv2Error
from . import polygons

__all__ = [
    "BAD_DATA_MODES",
    "CocoReport",
    "check_mode",
    "load_training_dicts",
    "reading_dataset",
    "validate_coco_json",
    "validate_datasets",
]

logger = logging.getLogger(__name__)

BAD_DATA_MODES = ("fail", "skip")
_MAX_LISTED = 10
_OPTION = "DATASETS.DCNV2.ON_BAD_DATA"


@dataclass
class CocoReport:
    """What :func:`validate_coco_json` found: problems, drops, malformed polygons."""

    json_file: str
    problems: List[str] = field(default_factory=list)
    bad_image_ids: set = field(default_factory=set)
    bad_annotation_indices: set = field(default_factory=set)
    polygon_issues: List[polygons.PolygonIssue] = field(default_factory=list)
    data: Optional[dict] = None

    def summary(self, dataset_name: str, limit: int = _MAX_LISTED) -> str:
        n = len(self.problems)
        lines = [f"Dataset {dataset_name!r}: {self.json_file} has {n} problem{'s' * (n != 1)}:"]
        lines += [f"  {p}" for p in self.problems[:limit]]
        if n > limit:
            lines.append(f"  ... and {n - limit} more")
        return "\n".join(lines)

    def cleaned(self, mask_on: bool = True) -> dict:
        """The parsed JSON without the bad entries, malformed polygons fixed for ``mask_on``."""
        data = dict(self.data)
        data["images"] = [
            im
            for im in data["images"]
            if isinstance(_id(im), (int, str)) and _id(im) not in self.bad_image_ids
        ]
        kept = {_id(im) for im in data["images"]}
        issues = {issue.index: issue for issue in self.polygon_issues}
        annotations = []
        for i, a in enumerate(data["annotations"]):
            if i in self.bad_annotation_indices or a.get("image_id") not in kept:
                continue
            if i in issues:
                a = polygons.fix_annotation(a, issues[i], mask_on)
            if a is not None:
                annotations.append(a)
        data["annotations"] = annotations
        return data


def _id(entry):
    return entry.get("id") if isinstance(entry, dict) else None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_mode(mode: str) -> str:
    """``mode`` if it is a ``DATASETS.DCNV2.ON_BAD_DATA`` value, else an AnnotationError."""
    if mode not in BAD_DATA_MODES:
        raise AnnotationError(
            f"{_OPTION} is {mode!r}; expected one of {', '.join(map(repr, BAD_DATA_MODES))}"
        )
    return mode


@contextlib.contextmanager
def reading_dataset(name: str):
    """Turn any failure inside the block into one AnnotationError naming dataset ``name``."""
    try:
        yield
    except DCNv2Error as e:
        if repr(name) in str(e):
            raise
        raise AnnotationError(f"Dataset {name!r}: {e}") from None
    except Exception as e:
        if name not in DatasetCatalog.list():
            raise AnnotationError(
                f"Dataset {name!r} is not registered; expected a detectron2 or dcnv2 dataset name "
                "or one of DATASETS.DCNV2.COCO"
            ) from None
        json_file = MetadataCatalog.get(name).get("json_file", None)
        source = f" from {json_file}" if json_file else ""
        text = e.args[0] if isinstance(e, KeyError) and e.args else e  # str(KeyError) is a repr
        reason = " ".join(str(text).split()).rstrip(".") or "(no message)"
        raise AnnotationError(
            f"Dataset {name!r} cannot be read{source}: {type(e).__name__}: {reason}. Expected a "
            "COCO instances file (train_net.py's checks list each bad entry)."
        ) from None


def _load_json(json_file: str) -> dict:
    try:
        with open(json_file, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise AnnotationError(f"Cannot read annotation file {json_file}: {e.strerror}") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno})" if hasattr(e, "lineno") else ""
        raise AnnotationError(
            f"Annotation file {json_file} is not valid JSON{where}: {getattr(e, 'msg', e)}. "
            "Expected a COCO instances file: an object with 'images', 'annotations' and "
            "'categories' lists. A file cut short by an interrupted copy looks like this."
        ) from None
    if not isinstance(data, dict):
        raise AnnotationError(
            f"Annotation file {json_file} holds a JSON {type(data).__name__}; expected an object "
            "with 'images', 'annotations' and 'categories' lists (COCO instances format)"
        )
    missing = [
        k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)
    ]
    if missing:
        raise AnnotationError(
            f"Annotation file {json_file} has no {' / '.join(repr(k) for k in missing)} list; "
            "expected an object with 'images', 'annotations' and 'categories' lists "
            "(COCO instances format)"
        )
    return data


def _category_ids(json_file: str, categories: list) -> set:
    cat_ids = set()
    for c in categories:
        cid = _id(c)
        if not _is_int(cid) or not isinstance(c.get("name"), str):
            raise AnnotationError(
                f"Annotation file {json_file}: category {c!r} is not an integer 'id' and a "
                "string 'name'; expected 'categories' entries like {'id': 1, 'name': 'person'}"
            )
        if cid in cat_ids:
            raise AnnotationError(
                f"Annotation file {json_file}: category id {cid} appears twice in 'categories'"
            )
        cat_ids.add(cid)
    if not cat_ids:
        raise AnnotationError(f"Annotation file {json_file}: 'categories' is empty")
    return cat_ids


def _image_problem(im, id_type, sizes) -> Optional[str]:
    """What is wrong with an ``images`` entry; a valid, new id goes into ``sizes``."""
    iid = _id(im)
    if not isinstance(im, dict) or not isinstance(iid, (int, str)) or isinstance(iid, bool):
        return f"image entry {im!r} has no integer or string 'id'"
    if type(iid) is not id_type:
        return (
            f"image id {iid!r} is a {type(iid).__name__}, the first image's a "
            f"{id_type.__name__}; expected ids of one type (detectron2 sorts them)"
        )
    if iid in sizes:
        return f"image id {iid} is listed twice"
    name, h, w = im.get("file_name"), im.get("height"), im.get("width")
    sizes[iid] = (h, w)
    if not isinstance(name, str) or not name:
        return f"image id {iid} has no 'file_name' string"
    if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
        return f"image id {iid} ({name}) has height={h!r}, width={w!r}; expected positive integers"
    return None


def validate_coco_json(
    json_file: str, image_root: Optional[str] = None, *, check_files: bool = True
) -> CocoReport:
    """Check a COCO instances file entry by entry (and, with ``check_files``, its image files)."""
    data = _load_json(json_file)
    report = CocoReport(json_file=json_file, data=data)
    problems = report.problems
    cat_ids = _category_ids(json_file, data["categories"])

    sizes = {}  # image id -> (height, width)
    first = _id(data["images"][0]) if data["images"] else None
    id_type = str if isinstance(first, str) else int
    for im in data["images"]:
        problem = _image_problem(im, id_type, sizes)
        if problem is None and check_files and image_root is not None:
            path = os.path.join(image_root, im["file_name"])
            if not os.path.isfile(path):
                problem = f"image id {im['id']}: file {path} not found"
        if problem is not None:
            problems.append(problem)
            iid = _id(im)
            report.bad_image_ids.add(iid if isinstance(iid, (int, str)) else None)

    seen_ann_ids = set()
    cats_text = _ids_text(cat_ids)
    for i, a in enumerate(data["annotations"]):
        aid = _id(a)
        what = f"annotation id {aid}" if aid is not None else f"annotation #{i}"
        problem = _annotation_problem(a, sizes, cat_ids, cats_text)
        if problem is None and aid in seen_ann_ids:
            problem = "repeats an annotation id (detectron2 needs unique ids)"
        if problem is not None:
            img = a.get("image_id") if isinstance(a, dict) else None
            problems.append(f"{what}{f' (image {img})' if img is not None else ''}: {problem}")
            report.bad_annotation_indices.add(i)
        else:
            seen_ann_ids.add(aid)
    report.polygon_issues = [
        issue
        for issue in polygons.find_polygon_issues(data["annotations"])
        if issue.index not in report.bad_annotation_indices
    ]
    return report


def _ids_text(ids: Iterable[int], limit: int = 12) -> str:
    ids = sorted(ids)
    text = ", ".join(str(i) for i in ids[:limit])
    return text + (", ..." if len(ids) > limit else "")


def _annotation_problem(a, sizes, cat_ids, cats_text) -> Optional[str]:
    if not isinstance(a, dict):
        return f"is a {type(a).__name__}, expected an object"
    aid = a.get("id")
    if not isinstance(aid, (int, str)) or isinstance(aid, bool):
        return f"'id' {aid!r} is not an integer or string (pycocotools indexes by it)"
    image_id = a.get("image_id")
    if not isinstance(image_id, (int, str)) or isinstance(image_id, bool) or image_id not in sizes:
        return f"image_id {a.get('image_id')!r} is not in 'images'"
    cid = a.get("category_id")
    if not _is_int(cid) or cid not in cat_ids:
        return f"category_id {cid!r} is not in 'categories' (ids {cats_text})"
    box = a.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(map(_is_number, box))):
        return f"bbox {box!r} is not [x, y, width, height] with 4 finite numbers"
    if box[2] < 0 or box[3] < 0:
        return f"bbox {list(box)} has a negative size; expected [x, y, width, height], w, h >= 0"
    if a.get("iscrowd", 0) not in (0, 1) or type(a.get("iscrowd", 0)) not in (int, bool):
        return f"iscrowd {a.get('iscrowd')!r} is not 0 or 1"
    if "area" in a and not (_is_number(a["area"]) and a["area"] >= 0):
        return f"area {a['area']!r} is not a non-negative number"
    if a.get("ignore", 0) not in (0, False):
        return "has 'ignore' set, which detectron2 does not support (use 'iscrowd': 1)"
    problem = _segmentation_problem(a.get("segmentation"), sizes[a["image_id"]])
    if problem is None and a.get("keypoints") is not None:
        k = a["keypoints"]
        if not (isinstance(k, list) and len(k) % 3 == 0 and all(map(_is_number, k))):
            problem = f"keypoints {k!r} is not a list of [x, y, visibility] numbers"
    return problem


def _segmentation_problem(segmentation, size) -> Optional[str]:
    """What is wrong with a ``segmentation``'s type; ``size``: its image's (height, width)."""
    if segmentation is None or isinstance(segmentation, list):
        return None
    if not isinstance(segmentation, dict):
        return (
            f"segmentation {segmentation!r} is neither a list of polygons nor an RLE "
            "{'counts': ..., 'size': [height, width]}"
        )
    counts, rle_size = segmentation.get("counts"), segmentation.get("size")
    if not (isinstance(counts, str) or (isinstance(counts, list) and all(map(_is_int, counts)))):
        return f"RLE segmentation 'counts' {counts!r} is not a string or a list of integers"
    if not (isinstance(rle_size, list) and len(rle_size) == 2 and all(map(_is_int, rle_size))):
        return f"RLE segmentation 'size' {rle_size!r} is not [height, width]"
    if all(map(_is_int, size)) and rle_size != list(size):
        return f"RLE segmentation 'size' {rle_size} differs from its image's {list(size)}"
    return None


def _coco_files(name: str):
    """(json_file, image_root) of a dataset read by ``load_coco_json``, else Nones."""
    meta = MetadataCatalog.get(name)
    if meta.get("evaluator_type", None) != "coco":
        return None, None
    return meta.get("json_file", None), meta.get("image_root", None)


def _category_text(categories: List[tuple]) -> str:
    text = ", ".join(f"{cid}:{name}" for cid, name in categories[:_MAX_LISTED])
    return text + (f", ... ({len(categories)} in all)" if len(categories) > _MAX_LISTED else "")


def _check_categories(
    json_file: str,
    categories: List[tuple],
    num_classes: Dict[str, int],
    first: Optional[tuple],
) -> None:
    """Check the categories fit the model's class count and equal the first dataset's."""
    for key, value in num_classes.items():
        if value != len(categories):
            raise AnnotationError(
                f"Annotation file {json_file} has {len(categories)} categories "
                f"({_category_text(categories)}) but {key} is {value}; expected them equal. Set "
                f"{key} {len(categories)} (a model trained with another count keeps a head of "
                "the wrong size), or use a dataset with the model's categories."
            )
    if first is not None and categories != first[1]:
        raise AnnotationError(
            f"Annotation files {first[0]} and {json_file} list different categories "
            f"({_category_text(first[1])} vs {_category_text(categories)}); expected the same "
            "ids and names in every dataset of a run (class indices follow the sorted ids)."
        )


def validate_datasets(
    train_names: Sequence[str],
    test_names: Sequence[str] = (),
    mode: str = "fail",
    *,
    num_classes: Optional[Dict[str, int]] = None,
) -> Dict[str, CocoReport]:
    """Validate the COCO-format datasets a run reads.

    Test sets' problems always stop the run; training sets' are warnings with ``mode="skip"``.

    Args:
        num_classes: config key -> the model's class count, compared with each dataset's categories.

    Returns:
        dict: dataset name -> report, for the datasets with problems (warned about).
    """
    check_mode(mode)
    reports = {}
    first_categories = None
    for name in dict.fromkeys(list(train_names) + list(test_names)):
        json_file, image_root = _coco_files(name)
        if json_file is None or not os.path.isfile(json_file):
            continue  # not COCO-format, or check_datasets reports it
        with reading_dataset(name):
            report = validate_coco_json(json_file, image_root)
        categories = sorted((_id(c), c["name"]) for c in report.data["categories"])
        _check_categories(json_file, categories, num_classes or {}, first_categories)
        first_categories = first_categories or (json_file, categories)
        if name in train_names and not report.data["annotations"]:
            raise AnnotationError(
                f"Annotation file {json_file} (training set {name!r}) has no annotations "
                "('annotations' is empty); expected at least one object to train on"
            )
        if not report.problems:
            continue
        if name in test_names:
            hint = (
                "This dataset is evaluated on, and evaluation reads this file as ground truth: "
                "fix the file."
            )
            raise AnnotationError(report.summary(name) + "\n" + hint)
        if mode == "fail":
            raise AnnotationError(
                report.summary(name)
                + f"\nFix the file, or set {_OPTION} skip to drop these entries with a warning "
                "and train on the rest."
            )
        logger.warning(
            report.summary(name) + f"\n{_OPTION} is 'skip': training without these entries."
        )
        reports[name] = report
    return reports


def load_training_dicts(
    names: Sequence[str],
    mode: str = "fail",
    *,
    filter_empty: bool = True,
    min_keypoints: int = 0,
    proposal_files: Optional[Sequence[str]] = None,
    mask_on: bool = True,
):
    """Training dataset dicts as ``get_detection_dataset_dicts`` gives them, bad entries handled."""
    names = [names] if isinstance(names, str) else list(names)
    reports = validate_datasets(names, (), mode) if check_mode(mode) == "skip" else {}
    reports.update(_polygon_reports([n for n in names if n not in reports]))
    per_dataset = []
    for name in names:
        report = reports.get(name)
        if report is not None and report.polygon_issues:
            files = {_id(im): im.get("file_name") for im in report.data["images"]}
            logger.warning(
                polygons.warning(name, report.json_file, report.polygon_issues, files, mask_on)
            )
        with reading_dataset(name):
            if report is None:
                per_dataset.append(DatasetCatalog.get(name))
            else:
                per_dataset.append(_cleaned_dicts(name, report, mask_on))
    return _prepare_dicts(names, per_dataset, filter_empty, min_keypoints, proposal_files)


def _polygon_reports(names: Sequence[str]) -> Dict[str, CocoReport]:
    """Reports, holding only malformed polygons, of the COCO-format sets among ``names``."""
    reports = {}
    for name in dict.fromkeys(names):
        json_file, image_root = _coco_files(name)
        if json_file is None or not os.path.isfile(json_file):
            continue
        with reading_dataset(name):
            report = validate_coco_json(json_file, image_root, check_files=False)
        if report.polygon_issues:
            report.bad_image_ids.clear()
            report.bad_annotation_indices.clear()
            reports[name] = report
    return reports


def _cleaned_dicts(name: str, report: CocoReport, mask_on: bool = True) -> List[dict]:
    # What register_coco_instances's loader returns, read from the cleaned JSON.
    from detectron2.data.datasets import load_coco_json

    with tempfile.TemporaryDirectory(prefix="dcnv2_clean_annotations_") as tmp:
        clean_file = os.path.join(tmp, "annotations.json")
        with open(clean_file, "w") as f:
            json.dump(report.cleaned(mask_on), f)
        return load_coco_json(clean_file, _coco_files(name)[1], name)


def _prepare_dicts(names, per_dataset, filter_empty, min_keypoints, proposal_files):
    # detectron2's get_detection_dataset_dicts after DatasetCatalog.get (it takes names).
    from detectron2.data.build import (
        filter_images_with_few_keypoints,
        filter_images_with_only_crowd_annotations,
        load_proposals_into_dataset,
        print_instances_class_histogram,
    )
    from detectron2.data.detection_utils import check_metadata_consistency
    from torch.utils.data import ConcatDataset, Dataset

    if isinstance(per_dataset[0], Dataset):
        return per_dataset[0] if len(per_dataset) == 1 else ConcatDataset(per_dataset)
    for name, dicts in zip(names, per_dataset):
        if not len(dicts):
            raise AnnotationError(f"Dataset {name!r} has no image left to train on")
    if proposal_files is not None:
        per_dataset = [
            load_proposals_into_dataset(dicts, proposal_file)
            for dicts, proposal_file in zip(per_dataset, proposal_files)
        ]
    dataset_dicts = [d for dicts in per_dataset for d in dicts]
    has_instances = "annotations" in dataset_dicts[0]
    if filter_empty and has_instances:
        dataset_dicts = filter_images_with_only_crowd_annotations(dataset_dicts)
    if min_keypoints > 0 and has_instances:
        dataset_dicts = filter_images_with_few_keypoints(dataset_dicts, min_keypoints)
    if has_instances:
        try:
            class_names = MetadataCatalog.get(names[0]).thing_classes
            check_metadata_consistency("thing_classes", names)
            print_instances_class_histogram(dataset_dicts, class_names)
        except AttributeError:  # class names are not available for this dataset
            pass
    if not dataset_dicts:
        raise AnnotationError(f"No image left to train on in {', '.join(names)}")
    return dataset_dicts
