"""Checks of COCO instances files, and one-line errors for any failure while a dataset is read.

``DATASETS.DCNV2.ON_BAD_DATA`` "fail" stops a run on a bad entry; "skip" (training sets only) drops
them with a warning. Malformed polygons are dropped only where they must be, in one warning: a box
model keeps the box, a mask model the valid polygons. :func:`reading_dataset` names the dataset and
json of a loader's failure.
"""

import contextlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.build import (
    filter_images_with_few_keypoints,
    filter_images_with_only_crowd_annotations,
    load_proposals_into_dataset,
    print_instances_class_histogram,
)
from detectron2.data.datasets import load_coco_json
from detectron2.data.detection_utils import check_metadata_consistency
from torch.utils.data import ConcatDataset, Dataset

from ..errors import AnnotationError, DCNv2Error

__all__ = [
    "CocoReport",
    "check_mode",
    "listed",
    "load_training_dicts",
    "polygon_problem",
    "reading_dataset",
    "validate_coco_json",
    "validate_datasets",
]

logger = logging.getLogger(__name__)

OPTION = "DATASETS.DCNV2.ON_BAD_DATA"
_COCO = "expected an object with 'images', 'annotations' and 'categories' lists (COCO instances)"


def listed(items: Sequence, limit: int = 10, sep: str = ", ") -> str:
    """The first ``limit`` of ``items`` joined by ``sep``, and how many more there are."""
    more = f"{sep}... and {len(items) - limit} more" if len(items) > limit else ""
    return sep.join(map(str, items[:limit])) + more


@dataclass
class CocoReport:
    """What :func:`validate_coco_json` found: problems, drops, malformed polygons."""

    json_file: str
    data: dict
    problems: List[str] = field(default_factory=list)
    bad_image_ids: set = field(default_factory=set)
    bad_annotation_indices: set = field(default_factory=set)
    polygon_issues: Dict[int, "PolygonIssue"] = field(default_factory=dict)  # by annotation index

    def summary(self, dataset_name: str) -> str:
        n = len(self.problems)
        head = f"Dataset {dataset_name!r}: {self.json_file} has {n} problem{'s' * (n != 1)}:"
        return "\n  ".join([head, listed(self.problems, sep="\n  ")])

    def cleaned(self, mask_on: bool = True) -> dict:
        """The parsed JSON without the bad entries, malformed polygons fixed for ``mask_on``."""
        images = [im for im in self.data["images"] if _is_key(_id(im))]
        images = [im for im in images if _id(im) not in self.bad_image_ids]
        kept = {_id(im) for im in images}
        annotations = []
        for i, a in enumerate(self.data["annotations"]):
            if i in self.bad_annotation_indices or a.get("image_id") not in kept:
                continue
            issue = self.polygon_issues.get(i)
            if issue is not None and not mask_on:  # a box model keeps the box
                a = {k: v for k, v in a.items() if k != "segmentation"}
            elif issue is not None:  # a mask model keeps the valid polygons, if any
                a = dict(a, segmentation=issue.valid) if issue.valid else None
            if a is not None:
                annotations.append(a)
        return dict(self.data, images=images, annotations=annotations)


def _id(entry):
    return entry.get("id") if isinstance(entry, dict) else None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_key(v) -> bool:
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_mode(mode: str) -> str:
    """``mode`` if it is a ``DATASETS.DCNV2.ON_BAD_DATA`` value, else an AnnotationError."""
    if mode not in ("fail", "skip"):
        raise AnnotationError(f"{OPTION} is {mode!r}; expected one of 'fail', 'skip'")
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
            data = json.load(f)
    except OSError as e:
        raise AnnotationError(f"Cannot read annotation file {json_file}: {e.strerror}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        where = f" (line {e.lineno}, column {e.colno})" if hasattr(e, "lineno") else ""
        raise AnnotationError(
            f"Annotation file {json_file} is not valid JSON{where}: {getattr(e, 'msg', e)} (cut "
            f"short by an interrupted copy?); {_COCO}"
        ) from None
    keys = ("images", "annotations", "categories")
    missing = [k for k in keys if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        raise AnnotationError(
            f"Annotation file {json_file} has no {' / '.join(map(repr, missing))} list; {_COCO}"
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
            raise AnnotationError(f"Annotation file {json_file}: category id {cid} appears twice")
        cat_ids.add(cid)
    if not cat_ids:
        raise AnnotationError(f"Annotation file {json_file}: 'categories' is empty")
    return cat_ids


def _image_problem(im, id_type, sizes) -> Optional[str]:
    """What is wrong with an ``images`` entry; a valid, new id goes into ``sizes``."""
    iid = _id(im)
    if not _is_key(iid):
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
    report = CocoReport(json_file, data)
    cat_ids = _category_ids(json_file, data["categories"])
    sizes = {}  # image id -> (height, width)
    id_type = str if data["images"] and isinstance(_id(data["images"][0]), str) else int
    for im in data["images"]:
        problem = _image_problem(im, id_type, sizes)
        if problem is None and check_files and image_root is not None:
            path = os.path.join(image_root, im["file_name"])
            if not os.path.isfile(path):
                problem = f"image id {im['id']}: file {path} not found"
        if problem is not None:
            report.problems.append(problem)
            report.bad_image_ids.add(_id(im) if _is_key(_id(im)) else None)

    seen_ann_ids = set()
    cats_text = listed(sorted(cat_ids), 12)
    for i, a in enumerate(data["annotations"]):
        aid = _id(a)
        problem = _annotation_problem(a, sizes, cat_ids, cats_text)
        if problem is None and aid in seen_ann_ids:
            problem = "repeats an annotation id (detectron2 needs unique ids)"
        if problem is None:
            seen_ann_ids.add(aid)
            issue = _polygon_issue(a)
            if issue is not None:
                report.polygon_issues[i] = issue
            continue
        what = f"annotation id {aid}" if aid is not None else f"annotation #{i}"
        img = a.get("image_id") if isinstance(a, dict) else None
        report.problems.append(f"{what}{f' (image {img})' if img is not None else ''}: {problem}")
        report.bad_annotation_indices.add(i)
    return report


def _annotation_problem(a, sizes, cat_ids, cats_text) -> Optional[str]:
    if not isinstance(a, dict):
        return f"is a {type(a).__name__}, expected an object"
    aid, image_id, cid, box = (a.get(k) for k in ("id", "image_id", "category_id", "bbox"))
    crowd, area, k = a.get("iscrowd", 0), a.get("area", 0), a.get("keypoints")
    if not _is_key(aid):
        return f"'id' {aid!r} is not an integer or string (pycocotools indexes by it)"
    if not _is_key(image_id) or image_id not in sizes:
        return f"image_id {image_id!r} is not in 'images'"
    if not _is_int(cid) or cid not in cat_ids:
        return f"category_id {cid!r} is not in 'categories' (ids {cats_text})"
    if not (isinstance(box, list) and len(box) == 4 and all(map(_is_number, box))):
        return f"bbox {box!r} is not [x, y, width, height] with 4 finite numbers"
    if box[2] < 0 or box[3] < 0:
        return f"bbox {box} has a negative size; expected [x, y, width, height], w, h >= 0"
    if crowd not in (0, 1) or type(crowd) not in (int, bool):
        return f"iscrowd {crowd!r} is not 0 or 1"
    if not (_is_number(area) and area >= 0):
        return f"area {area!r} is not a non-negative number"
    if a.get("ignore", 0) not in (0, False):
        return "has 'ignore' set, which detectron2 does not support (use 'iscrowd': 1)"
    if k is not None and not (isinstance(k, list) and len(k) % 3 == 0 and all(map(_is_number, k))):
        return f"keypoints {k!r} is not a list of [x, y, visibility] numbers"
    seg, size = a.get("segmentation"), list(sizes[image_id])
    if seg is None or isinstance(seg, list):
        return None  # polygons: _polygon_issue
    if not isinstance(seg, dict):
        return (
            f"segmentation {seg!r} is neither a list of polygons nor an RLE "
            "{'counts': ..., 'size': [height, width]}"
        )
    counts, rle_size = seg.get("counts"), seg.get("size")
    if not (isinstance(counts, str) or (isinstance(counts, list) and all(map(_is_int, counts)))):
        return f"RLE segmentation 'counts' {counts!r} is not a string or a list of integers"
    if not (isinstance(rle_size, list) and len(rle_size) == 2 and all(map(_is_int, rle_size))):
        return f"RLE segmentation 'size' {rle_size!r} is not [height, width]"
    if all(map(_is_int, size)) and rle_size != size:
        return f"RLE segmentation 'size' {rle_size} differs from its image's {size}"
    return None


def polygon_problem(polygon) -> Optional[str]:
    """What is wrong with one polygon, or None when it is a valid ``[x1, y1, ..., xn, yn]``."""
    if not isinstance(polygon, (list, tuple)):
        return f"a polygon is a {type(polygon).__name__}, not a list of coordinates"
    numbers = [v for v in polygon if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numbers) != len(polygon):
        return f"a polygon holds {len(polygon) - len(numbers)} non-numeric value(s)"
    if not all(math.isfinite(v) for v in numbers):
        return "a polygon holds a non-finite coordinate (NaN or infinity)"
    if len(polygon) % 2:
        return f"a polygon has an odd count of numbers ({len(polygon)}); expected x, y pairs"
    if len(polygon) < 6:
        return f"a polygon has {len(polygon)} numbers; expected at least 6 (3 points)"
    return None


@dataclass
class PolygonIssue:
    """An annotation with malformed polygons: the first problem, the valid ones."""

    annotation: dict
    reason: str
    valid: List[list]


def _polygon_issue(a: dict) -> Optional[PolygonIssue]:
    segmentation = a.get("segmentation")
    if not isinstance(segmentation, list):
        return None  # an RLE, or no mask
    problems = [polygon_problem(p) for p in segmentation]
    bad = [p for p in problems if p is not None]
    if not bad:
        return None
    valid = [poly for poly, p in zip(segmentation, problems) if p is None]
    many = f" ({len(bad)} of its {len(segmentation)} polygons)" if len(segmentation) > 1 else ""
    return PolygonIssue(a, bad[0] + many, valid)


def _polygon_warning(name: str, report: CocoReport, mask_on: bool) -> str:
    """The one warning naming every annotation with malformed polygons, and what training does."""
    files = {_id(im): im.get("file_name") for im in report.data["images"] if _is_key(_id(im))}
    lines = []
    for issue in report.polygon_issues.values():
        if not mask_on:
            action = "box kept without its segmentation"
        elif issue.valid:
            action = f"kept with its {len(issue.valid)} valid polygon(s)"
        else:
            action = "instance dropped (no valid polygon for its mask)"
        image_id, aid = issue.annotation["image_id"], issue.annotation["id"]
        image = files.get(image_id, image_id)
        lines.append(f"image {image}, annotation id {aid}: {issue.reason}; {action}")
    n = len(lines)
    head = (
        f"Dataset {name!r}: {report.json_file} has {n} annotation{'s' * (n != 1)} with malformed "
        "polygons (expected [x1, y1, x2, y2, ...] with at least 3 points):"
    )
    tail = (
        "MODEL.MASK_ON is True: an instance without a valid polygon has no mask to learn."
        if mask_on
        else "MODEL.MASK_ON is False: the boxes train as usual."
    )
    return "\n  ".join([head, listed(lines, sep="\n  ")]) + "\n" + tail


def _report(name: str, check_files: bool = True) -> Optional[CocoReport]:
    """The report of a dataset read by ``load_coco_json``, None for others or a missing json."""
    meta = MetadataCatalog.get(name)
    json_file = meta.get("json_file", None)
    if meta.get("evaluator_type", None) != "coco" or not os.path.isfile(json_file or ""):
        return None  # not COCO-format, or check_datasets reports it
    with reading_dataset(name):
        return validate_coco_json(json_file, meta.get("image_root", None), check_files=check_files)


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
    reports, first = {}, None  # first: (json_file, categories, their text)
    for name in dict.fromkeys(list(train_names) + list(test_names)):
        report = _report(name)
        if report is None:
            continue
        json_file = report.json_file
        cats = sorted((_id(c), c["name"]) for c in report.data["categories"])
        text = listed([f"{cid}:{cat}" for cid, cat in cats])
        for key, value in (num_classes or {}).items():
            if value != len(cats):
                raise AnnotationError(
                    f"Annotation file {json_file} has {len(cats)} categories ({text}) but {key} "
                    f"is {value}; expected them equal. Set {key} {len(cats)} (a model trained "
                    "with another count keeps a head of the wrong size), or use a dataset with "
                    "the model's categories."
                )
        first = first or (json_file, cats, text)
        if cats != first[1]:
            raise AnnotationError(
                f"Annotation files {first[0]} and {json_file} list different categories "
                f"({first[2]} vs {text}); expected the same ids and names in every dataset of a "
                "run (class indices follow the sorted ids)."
            )
        if name in train_names and not report.data["annotations"]:
            raise AnnotationError(
                f"Annotation file {json_file} (training set {name!r}) has no annotations; "
                "expected at least one object to train on"
            )
        if not report.problems:
            continue
        if name in test_names:
            raise AnnotationError(
                report.summary(name) + "\nThis dataset is evaluated on, and evaluation reads "
                "this file as ground truth: fix the file."
            )
        if mode == "fail":
            raise AnnotationError(
                report.summary(name) + f"\nFix the file, or set {OPTION} skip to drop these "
                "entries with a warning and train on the rest."
            )
        logger.warning(
            report.summary(name) + f"\n{OPTION} is 'skip': training without these entries."
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
    per_dataset = []
    for name in names:
        report = reports.get(name)
        if report is None:  # only its malformed polygons are handled
            full = _report(name, check_files=False)
            if full is not None and full.polygon_issues:
                report = CocoReport(full.json_file, full.data, polygon_issues=full.polygon_issues)
        if report is not None and report.polygon_issues:
            logger.warning(_polygon_warning(name, report, mask_on))
        with reading_dataset(name):
            if report is None:
                per_dataset.append(DatasetCatalog.get(name))
                continue
            # What register_coco_instances's loader returns, read from the cleaned JSON.
            with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
                json.dump(report.cleaned(mask_on), f)
                f.flush()
                image_root = MetadataCatalog.get(name).image_root
                per_dataset.append(load_coco_json(f.name, image_root, name))
    return _prepare_dicts(names, per_dataset, filter_empty, min_keypoints, proposal_files)


def _prepare_dicts(names, per_dataset, filter_empty, min_keypoints, proposal_files):
    # detectron2's get_detection_dataset_dicts after DatasetCatalog.get (it takes names).
    if isinstance(per_dataset[0], Dataset):
        return per_dataset[0] if len(per_dataset) == 1 else ConcatDataset(per_dataset)
    for name, dicts in zip(names, per_dataset):
        if not len(dicts):
            raise AnnotationError(f"Dataset {name!r} has no image left to train on")
    if proposal_files is not None:
        per_dataset = list(map(load_proposals_into_dataset, per_dataset, proposal_files))
    dataset_dicts = [d for dicts in per_dataset for d in dicts]
    if "annotations" in dataset_dicts[0]:
        if filter_empty:
            dataset_dicts = filter_images_with_only_crowd_annotations(dataset_dicts)
        if min_keypoints > 0:
            dataset_dicts = filter_images_with_few_keypoints(dataset_dicts, min_keypoints)
        with contextlib.suppress(AttributeError):  # class names are not available
            class_names = MetadataCatalog.get(names[0]).thing_classes
            check_metadata_consistency("thing_classes", names)
            print_instances_class_histogram(dataset_dicts, class_names)
    if not dataset_dicts:
        raise AnnotationError(f"No image left to train on in {', '.join(names)}")
    return dataset_dicts
