"""Malformed polygons (dcnv2.data.validation through load_training_dicts): each annotation named
once (image file, annotation id) in one warning; a box-only model keeps the instance and its box,
a mask model drops only an instance with no valid polygon (detectron2 drops it in both cases)."""

import json
import logging

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.datasets import register_coco_instances

import dcnv2
from dcnv2.data.resumable import build_resumable_train_loader
from dcnv2.data.validation import load_training_dicts, polygon_problem

NAME = "_polygons_test"
SQUARE = [10, 10, 30, 10, 30, 30, 10, 30]


def _annotation(aid, image_id, segmentation, box=(10, 10, 20, 20)):
    return {"id": aid, "image_id": image_id, "category_id": 1, "bbox": list(box),
            "area": box[2] * box[3], "iscrowd": 0, "segmentation": segmentation}  # fmt: skip


@pytest.fixture
def dataset(tmp_path):
    images = [{"id": i, "file_name": f"{n}.png", "height": 64, "width": 64}
              for i, n in [(1, "a"), (2, "b"), (3, "c")]]  # fmt: skip
    annotations = [
        _annotation(1, 1, [SQUARE]),
        _annotation(2, 1, [SQUARE], box=(5, 5, 9, 9)),
        _annotation(7, 2, [[1, 2, 3, 4]], box=(2, 3, 11, 13)),  # 2 points: malformed
        _annotation(
            8, 3, [SQUARE, [1, 2, float("nan"), 4, 5, 6]], box=(20, 20, 10, 10)
        ),  # one of two malformed
        _annotation(9, 3, [[1, 2, 3, 4, 5, 6, 7]], box=(40, 40, 8, 6)),  # odd count
    ]
    json_file = tmp_path / "annotations.json"
    json_file.write_text(
        json.dumps(
            {"images": images, "annotations": annotations,
             "categories": [{"id": 1, "name": "thing"}]}
        )
    )  # fmt: skip
    register_coco_instances(NAME, {}, str(json_file), str(tmp_path))
    yield str(json_file)
    DatasetCatalog.remove(NAME)
    MetadataCatalog.remove(NAME)


def _boxes(dicts):
    return sorted(tuple(a["bbox"]) for d in dicts for a in d["annotations"])


def test_polygon_problem():
    assert polygon_problem(SQUARE) is None
    assert polygon_problem([1.5, 2, 3, 4, 5, 6]) is None
    assert "4 numbers; expected at least 6" in polygon_problem([1, 2, 3, 4])
    assert "odd count of numbers (7)" in polygon_problem([1, 2, 3, 4, 5, 6, 7])
    assert "non-finite" in polygon_problem([1, 2, float("inf"), 4, 5, 6])
    assert "non-numeric" in polygon_problem([1, 2, "3", 4, 5, 6])
    assert "not a list" in polygon_problem(7)


def test_box_only_model_keeps_every_instance(dataset, caplog):
    cfg = dcnv2.get_cfg(
        "quick/faster_rcnn_R50_mdconv_FPN_instant.yaml",
        ["DATASETS.TRAIN", f"('{NAME}',)", "DATALOADER.NUM_WORKERS", "0", "SEED", "1"],
    )
    assert not cfg.MODEL.MASK_ON
    # detectron2 alone drops the instances of annotations 7 and 9, valid boxes included.
    assert len(_boxes(get_detection_dataset_dicts([NAME]))) == 3
    with caplog.at_level(logging.WARNING, logger="dcnv2.data.validation"):
        loader = build_resumable_train_loader(cfg)
    dicts = list(loader.dataset.dicts)
    assert len(_boxes(dicts)) == 5
    assert (2, 3, 11, 13) in _boxes(dicts) and (40, 40, 8, 6) in _boxes(dicts)
    warnings = [r.getMessage() for r in caplog.records if "malformed polygons" in r.getMessage()]
    assert len(warnings) == 1, warnings
    text = warnings[0]
    assert f"Dataset {NAME!r}: {dataset} has 3 annotations with malformed polygons" in text
    assert (
        "image b.png, annotation id 7: a polygon has 4 numbers; expected at least 6 (3 points); "
        "box kept without its segmentation" in text
    )
    assert "image c.png, annotation id 8: a polygon holds a non-finite coordinate" in text
    assert "image c.png, annotation id 9: a polygon has an odd count of numbers (7)" in text
    assert text.count("annotation id") == 3
    malformed = {(2, 3, 11, 13), (20, 20, 10, 10), (40, 40, 8, 6)}
    kept = {tuple(a["bbox"]): "segmentation" in a for d in dicts for a in d["annotations"]}
    assert kept == {**{box: False for box in malformed}, (10, 10, 20, 20): True, (5, 5, 9, 9): True}


def test_mask_model_drops_only_instances_without_a_valid_polygon(dataset, caplog):
    with caplog.at_level(logging.WARNING, logger="dcnv2.data.validation"):
        dicts = load_training_dicts([NAME], "fail", filter_empty=False, mask_on=True)
    by_box = {tuple(a["bbox"]): a for d in dicts for a in d["annotations"]}
    assert len(by_box) == 3 and (2, 3, 11, 13) not in by_box and (40, 40, 8, 6) not in by_box
    # Annotation 8 keeps its valid polygon only.
    segmentations = sorted(len(a["segmentation"]) for a in by_box.values())
    assert segmentations == [1, 1, 1]
    assert "annotation id 7: a polygon has 4 numbers" in caplog.text
    assert "instance dropped (no valid polygon for its mask)" in caplog.text
    assert (
        "annotation id 8: a polygon holds a non-finite coordinate (NaN or infinity) (1 of its 2 "
        "polygons); kept with its 1 valid polygon(s)" in caplog.text
    )
