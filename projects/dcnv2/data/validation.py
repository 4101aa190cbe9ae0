"""Checks of COCO-format annotation files and of image reads, with one clear report.

``validate_coco_json`` reads an instances JSON and lists every problem that would make detectron2
crash mid-training, or train on garbage: a file that does not parse, a wrong structure, image
entries without a size or whose file is missing on disk, boxes with a negative or non-finite
size, category ids that are not in ``categories``, annotations of images that are not listed,
repeated ids. ``DATASETS.DCNV2.ON_BAD_DATA`` picks what happens:

* ``"fail"`` (default): stop before training with the list of problems (valid data is unaffected);
* ``"skip"``: warn, drop the bad entries (an annotation, or an image with its annotations) and
  train on the rest. Only for training sets: evaluation reads the file as ground truth.

Training images are decoded only when training reads them: an unreadable or truncated file then
stops the run naming the file (``"fail"``) or is replaced by the next readable image
(``"skip"``). Test images are checked before the run and when evaluation reads them
(:mod:`dcnv2.data.test_loader`). Malformed polygons are not problems: they are named in one
warning and training drops only what its model must (:mod:`dcnv2.data.polygons`).
"""

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..errors import AnnotationError
from . import polygons

__all__ = [
    "BAD_DATA_MODES",
    "CocoReport",
    "load_training_dicts",
    "validate_coco_json",
    "validate_datasets",
]

logger = logging.getLogger(__name__)

BAD_DATA_MODES = ("fail", "skip")
_MAX_LISTED = 10
_OPTION = "DATASETS.DCNV2.ON_BAD_DATA"


@dataclass
class CocoReport:
    """What :func:`validate_coco_json` found.

    Attributes:
        json_file: the file checked.
        problems: one line per problem, in file order.
        bad_image_ids: images to drop (with their annotations) to train on the rest.
        bad_annotation_indices: positions in ``annotations`` of the annotations to drop.
        polygon_issues: annotations with malformed polygons (:mod:`dcnv2.data.polygons`), not
            counted as problems: training drops only what its model must.
        data: the parsed JSON.
    """

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
        """The parsed JSON without the bad images and annotations, and with the malformed
        polygons handled for a model with (``mask_on``) or without a mask head
        (:func:`dcnv2.data.polygons.fix_annotation`)."""
        data = dict(self.data)
        data["images"] = [
            im
            for im in data["images"]
            if isinstance(im, dict) and _id(im) not in self.bad_image_ids
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


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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


def validate_coco_json(
    json_file: str, image_root: Optional[str] = None, *, check_files: bool = True
) -> CocoReport:
    """Check a COCO instances file; see the module docstring for what is checked.

    Args:
        json_file: the annotation file.
        image_root: the folder the images' ``file_name`` are relative to.
        check_files: also check that every listed image exists under ``image_root``.

    Returns:
        CocoReport: the problems and what to drop to train on the rest.

    Raises:
        AnnotationError: the file cannot be read, is not JSON, or lacks the top-level lists or
            valid categories (nothing can be trained from it, whatever the option).
    """
    data = _load_json(json_file)
    report = CocoReport(json_file=json_file, data=data)
    problems = report.problems

    cat_ids = set()
    for c in data["categories"]:
        cid = _id(c)
        if not isinstance(cid, int) or isinstance(cid, bool):
            raise AnnotationError(
                f"Annotation file {json_file}: category {c!r} has no integer 'id'; expected "
                "'categories' entries like {'id': 1, 'name': 'person'}"
            )
        if cid in cat_ids:
            raise AnnotationError(
                f"Annotation file {json_file}: category id {cid} appears twice in 'categories'"
            )
        cat_ids.add(cid)
    if not cat_ids:
        raise AnnotationError(f"Annotation file {json_file}: 'categories' is empty")

    image_ids = set()
    for im in data["images"]:
        iid = _id(im)
        if not isinstance(im, dict) or iid is None:
            problems.append(f"image entry {im!r} has no 'id'")
            report.bad_image_ids.add(None)
            continue
        if iid in image_ids:
            problems.append(f"image id {iid} is listed twice")
            report.bad_image_ids.add(iid)
            continue
        image_ids.add(iid)
        name = im.get("file_name")
        h, w = im.get("height"), im.get("width")
        if not isinstance(name, str) or not name:
            problems.append(f"image id {iid} has no 'file_name'")
            report.bad_image_ids.add(iid)
        elif not (_is_number(h) and _is_number(w) and h > 0 and w > 0):
            problems.append(
                f"image id {iid} ({name}) has height={h!r}, width={w!r}; expected positive numbers"
            )
            report.bad_image_ids.add(iid)
        elif check_files and image_root is not None:
            path = os.path.join(image_root, name)
            if not os.path.isfile(path):
                problems.append(f"image id {iid}: file {path} not found")
                report.bad_image_ids.add(iid)

    seen_ann_ids = set()
    cats_text = _ids_text(cat_ids)
    for i, a in enumerate(data["annotations"]):
        aid = _id(a)
        what = f"annotation id {aid}" if aid is not None else f"annotation #{i}"
        problem = _annotation_problem(a, image_ids, cat_ids, cats_text)
        if problem is None and aid in seen_ann_ids:
            problem = "repeats an annotation id (detectron2 needs unique ids)"
        if problem is not None:
            img = a.get("image_id") if isinstance(a, dict) else None
            problems.append(f"{what}{f' (image {img})' if img is not None else ''}: {problem}")
            report.bad_annotation_indices.add(i)
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


def _annotation_problem(a, image_ids, cat_ids, cats_text) -> Optional[str]:
    if not isinstance(a, dict):
        return f"is a {type(a).__name__}, expected an object"
    if a.get("image_id") not in image_ids:
        return f"image_id {a.get('image_id')!r} is not in 'images'"
    cid = a.get("category_id")
    if cid not in cat_ids:
        return f"category_id {cid!r} is not in 'categories' (ids {cats_text})"
    box = a.get("bbox")
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(map(_is_number, box))):
        return f"bbox {box!r} is not [x, y, width, height] with 4 finite numbers"
    if box[2] < 0 or box[3] < 0:
        return f"bbox {list(box)} has a negative size; expected [x, y, width, height], w, h >= 0"
    if a.get("ignore", 0) not in (0, False):
        return "has 'ignore' set, which detectron2 does not support (use 'iscrowd': 1)"
    return None


def _coco_files(name: str):
    """(json_file, image_root) of a dataset detectron2 loads with ``load_coco_json``, else Nones
    (LVIS and others have a ``json_file`` in another format)."""
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
    """The categories of ``json_file`` fit the model's class count and equal those of the
    first dataset checked (``first``: (json_file, categories), or None)."""
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
    """Validate the COCO-format datasets a run reads (those with ``json_file`` metadata).

    Args:
        train_names: ``DATASETS.TRAIN``; with ``mode="skip"`` their problems are warnings.
        test_names: ``DATASETS.TEST``; their problems always stop the run, since evaluation
            compares with the file itself.
        mode: ``"fail"`` or ``"skip"`` (``DATASETS.DCNV2.ON_BAD_DATA``).
        num_classes: config key -> the model's class count (``{"MODEL.ROI_HEADS.NUM_CLASSES":
            80}``), each compared with the number of categories of every dataset; the
            datasets' categories are also compared with each other.

    Returns:
        dict: dataset name -> report, for the datasets that have problems (warned about).

    Raises:
        AnnotationError: the first dataset whose problems stop the run, a training set without
            annotations, or categories that differ from the model's count or between datasets.
    """
    if mode not in BAD_DATA_MODES:
        raise AnnotationError(
            f"{_OPTION} is {mode!r}; expected one of {', '.join(map(repr, BAD_DATA_MODES))}"
        )
    reports = {}
    first_categories = None
    for name in dict.fromkeys(list(train_names) + list(test_names)):
        json_file, image_root = _coco_files(name)
        if json_file is None or not os.path.isfile(json_file):
            continue  # not COCO-format, or check_datasets reports it
        report = validate_coco_json(json_file, image_root)
        categories = sorted((_id(c), str(c.get("name", ""))) for c in report.data["categories"])
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
    """The dataset dicts of training sets, as detectron2's ``get_detection_dataset_dicts``
    loads and filters them; with ``mode="skip"``, the COCO-format sets with problems are read
    without their bad entries (:meth:`CocoReport.cleaned`). Annotations with malformed
    polygons are named in one warning and keep what the model uses (:mod:`dcnv2.data.polygons`).
    The registered datasets are used as they are: the catalog is not changed.

    Args:
        names: ``DATASETS.TRAIN`` (or one name).
        mode: ``DATASETS.DCNV2.ON_BAD_DATA``.
        filter_empty, min_keypoints, proposal_files: as ``get_detection_dataset_dicts``.
        mask_on: ``MODEL.MASK_ON``: whether the model reads the segmentations.

    Returns:
        list[dict] (or the registered torch ``Dataset``, as detectron2 returns it).
    """
    from detectron2.data import get_detection_dataset_dicts

    names = [names] if isinstance(names, str) else list(names)
    reports = validate_datasets(names, (), mode) if mode == "skip" else {}
    reports.update(_polygon_reports([n for n in names if n not in reports]))
    for name, report in reports.items():
        if report.polygon_issues:
            files = {_id(im): im.get("file_name") for im in report.data["images"]}
            logger.warning(
                polygons.warning(name, report.json_file, report.polygon_issues, files, mask_on)
            )
    if not reports:
        return get_detection_dataset_dicts(
            list(names),
            filter_empty=filter_empty,
            min_keypoints=min_keypoints,
            proposal_files=proposal_files,
        )
    per_dataset = [
        (
            _cleaned_dicts(name, reports[name], mask_on)
            if name in reports
            else DatasetCatalog.get(name)
        )
        for name in names
    ]
    return _prepare_dicts(names, per_dataset, filter_empty, min_keypoints, proposal_files)


def _polygon_reports(names: Sequence[str]) -> Dict[str, CocoReport]:
    """Reports of the COCO-format sets among ``names`` that have malformed polygons, holding
    only those (their other problems stopped the run before, in "fail" mode)."""
    reports = {}
    for name in dict.fromkeys(names):
        json_file, image_root = _coco_files(name)
        if json_file is None or not os.path.isfile(json_file):
            continue
        report = validate_coco_json(json_file, image_root, check_files=False)
        if report.polygon_issues:
            report.bad_image_ids.clear()
            report.bad_annotation_indices.clear()
            reports[name] = report
    return reports


def _cleaned_dicts(name: str, report: CocoReport, mask_on: bool = True) -> List[dict]:
    # What the registered loader of a COCO-format set (register_coco_instances) returns, read
    # from the cleaned JSON; load_coco_json also fills the dataset's metadata, as it would.
    from detectron2.data.datasets import load_coco_json

    with tempfile.TemporaryDirectory(prefix="dcnv2_clean_annotations_") as tmp:
        clean_file = os.path.join(tmp, "annotations.json")
        with open(clean_file, "w") as f:
            json.dump(report.cleaned(mask_on), f)
        return load_coco_json(clean_file, _coco_files(name)[1], name)


def _prepare_dicts(names, per_dataset, filter_empty, min_keypoints, proposal_files) -> List[dict]:
    # The steps of detectron2's get_detection_dataset_dicts after DatasetCatalog.get, through
    # its public helpers (it takes dataset names, not loaded dicts).
    from detectron2.data.build import (
        filter_images_with_few_keypoints,
        filter_images_with_only_crowd_annotations,
        load_proposals_into_dataset,
        print_instances_class_histogram,
    )
    from detectron2.data.detection_utils import check_metadata_consistency

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
