"""Hand-written COCO jsons with a wrong type in one field: the checks list the entry, and reading
the dataset (detectron2's load_coco_json in this process, the mapper in a data-loader worker) fails
with one AnnotationError line naming the dataset and its json, for datasets registered through
detectron2's register_coco_instances and through DATASETS.DCNV2.COCO alike."""

import json

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image

from dcnv2 import get_cfg
from dcnv2.data.coco import register_coco_datasets
from dcnv2.data.resumable import build_resumable_train_loader
from dcnv2.data.test_loader import load_test_dicts
from dcnv2.data.validation import validate_coco_json, validate_datasets
from dcnv2.errors import AnnotationError


def _coco():
    images = [{"id": i, "file_name": f"{i}.png", "height": 30, "width": 40} for i in (1, 2)]
    annotations = [
        {"id": k, "image_id": 1 + k % 2, "category_id": 1 + k % 2, "bbox": [2, 3, 10, 8],
         "area": 80.0, "iscrowd": 0, "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]]}
        for k in (1, 2, 3)
    ]  # fmt: skip
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def _set(where, key, value):
    def edit(coco):
        coco[where][0][key] = value

    return edit


# (edit of the json, what the check says about the entry)
CASES = {
    "bbox-string": (_set("annotations", "bbox", "2,3,10,8"), "bbox '2,3,10,8' is not [x, y,"),
    "bbox-3-numbers": (_set("annotations", "bbox", [2, 3, 10]), "bbox [2, 3, 10] is not"),
    "category-float-string": (_set("annotations", "category_id", "1.0"), "category_id '1.0'"),
    "category-float": (
        _set("annotations", "category_id", 1.0),
        "category_id 1.0 is not in 'categories' (ids 1, 2)",
    ),
    "segmentation-number": (_set("annotations", "segmentation", 5), "segmentation 5 is neither"),
    "rle-counts": (
        _set("annotations", "segmentation", {"counts": 7, "size": [30, 40]}),
        "'counts' 7 is not a string",
    ),
    "rle-size": (
        _set("annotations", "segmentation", {"counts": "PPYo", "size": [40, 30]}),
        "'size' [40, 30] differs from its image's [30, 40]",
    ),
    "iscrowd": (_set("annotations", "iscrowd", "0"), "iscrowd '0' is not 0 or 1"),
    "area": (_set("annotations", "area", "80"), "area '80' is not a non-negative number"),
    "annotation-id": (_set("annotations", "id", [1]), "'id' [1] is not an integer or string"),
    "keypoints": (_set("annotations", "keypoints", "1 2 2"), "keypoints '1 2 2' is not"),
    "image-height": (_set("images", "height", "30"), "height='30', width=40; expected positive"),
    "image-id": (_set("images", "id", 1.5), "has no integer or string 'id'"),
    "file-name": (_set("images", "file_name", 3), "has no 'file_name' string"),
}


@pytest.fixture
def make_dataset(tmp_path):
    """Write the json (after ``edit``) and two images; register it with detectron2's
    register_coco_instances (``how="detectron2"``) or DATASETS.DCNV2.COCO; its name and json."""
    names = []

    def make(edit, how="detectron2"):
        folder = tmp_path / f"d{len(names)}"
        folder.mkdir()
        for i in (1, 2):
            Image.fromarray(np.full((30, 40, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
        coco = _coco()
        edit(coco)
        json_file = str(folder / "annotations.json")
        with open(json_file, "w") as f:
            json.dump(coco, f)
        name = f"_test_validation_{len(names)}"
        if how == "detectron2":
            register_coco_instances(name, {}, json_file, str(folder))
        else:
            register_coco_datasets(((name, json_file, str(folder)),))
        names.append(name)
        return name, json_file

    yield make
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_a_valid_file_has_no_problem(make_dataset):
    name, json_file = make_dataset(lambda coco: None)
    assert validate_coco_json(json_file).problems == []
    assert validate_datasets([name]) == {}


@pytest.mark.parametrize("case", sorted(CASES))
def test_checks_name_the_entry_with_the_wrong_type(make_dataset, case):
    edit, expected = CASES[case]
    name, json_file = make_dataset(edit, "detectron2" if len(case) % 2 else "dcnv2")
    with pytest.raises(AnnotationError) as info:
        validate_datasets([name])
    lines = str(info.value).splitlines()
    # An image's problem leaves its annotations without an image: more problems follow.
    assert lines[0].startswith(f"Dataset {name!r}: {json_file} has ")
    assert expected in lines[1], lines


def test_categories_need_integer_ids_and_string_names(make_dataset):
    name, json_file = make_dataset(_set("categories", "name", 1))
    with pytest.raises(AnnotationError) as info:
        validate_datasets([name])
    message = str(info.value)
    assert message.startswith(f"Dataset {name!r}: Annotation file {json_file}: category")
    assert "is not an integer 'id' and a string 'name'" in message and "\n" not in message


def _cfg(name, workers):
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = (name,)
    cfg.DATALOADER.NUM_WORKERS = workers
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.INPUT.MIN_SIZE_TRAIN = (32,)
    cfg.MODEL.MASK_ON = False
    return cfg


@pytest.mark.parametrize(
    "case, how, workers",
    [
        ("category-float-string", "detectron2", 0),  # load_coco_json: KeyError
        ("segmentation-number", "dcnv2", 0),  # load_coco_json: TypeError
        ("image-id", "detectron2", 0),  # load_coco_json: sorts ids of two types
        ("bbox-string", "detectron2", 1),  # the mapper, in a worker
        ("bbox-3-numbers", "dcnv2", 0),  # the mapper, in this process
    ],
)
def test_reading_a_bad_dataset_is_one_line_naming_it(make_dataset, case, how, workers):
    edit, _ = CASES[case]
    if case == "image-id":
        edit = _set("images", "id", "1")  # ids of two types: detectron2 cannot sort them
    name, json_file = make_dataset(edit, how)
    with pytest.raises(AnnotationError) as info:
        next(iter(build_resumable_train_loader(_cfg(name, workers))))
    message = str(info.value)
    assert "\n" not in message and repr(name) in message and json_file in message, message


def test_reading_a_bad_test_set_is_one_line_naming_it(make_dataset):
    name, json_file = make_dataset(_set("annotations", "category_id", "1.0"))
    with pytest.raises(AnnotationError) as info:
        load_test_dicts(name)
    message = str(info.value)
    assert "\n" not in message and repr(name) in message and json_file in message, message


def test_an_unregistered_training_set_is_one_line():
    from dcnv2.data.validation import load_training_dicts

    with pytest.raises(AnnotationError, match=r"^Dataset '_no_such_set' is not registered;"):
        load_training_dicts(["_no_such_set"])
