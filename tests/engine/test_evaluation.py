"""EvaluatedImagesCOCOEvaluator scores the images it received: an oracle that predicts every
ground-truth box of the evaluated images gets AP 100 when an image was left out, where
detectron2's COCOEvaluator counts that image's objects as missed; a model that detects nothing
is said to in one warning line before detectron2's NaN metrics."""

import json
import logging
import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.structures import Boxes, Instances

from dcnv2.engine.evaluation import EvaluatedImagesCOCOEvaluator

# Image id -> [(category id, [x, y, w, h])]
BOXES = {
    1: [(1, [4, 6, 20, 18]), (2, [30, 30, 22, 16])],
    2: [(2, [10, 12, 25, 20])],
    3: [(1, [8, 40, 18, 15]), (1, [40, 4, 16, 24])],
}


@pytest.fixture
def dataset(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "height": 64, "width": 64} for i in BOXES]
    annotations = [
        {"id": 10 * i + k, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3],
         "iscrowd": 0}
        for i, boxes in BOXES.items()
        for k, (c, b) in enumerate(boxes)
    ]  # fmt: skip
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    json_file = tmp_path / "annotations.json"
    json_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    name = "_evaluated_images_test"
    register_coco_instances(name, {}, str(json_file), str(tmp_path))
    DatasetCatalog.get(name)  # fills the category id mapping the evaluator reads
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _oracle(image_id):
    """The ground truth of ``image_id`` as the model's output (score 1, contiguous classes)."""
    boxes = BOXES[image_id]
    instances = Instances((64, 64))
    instances.pred_boxes = Boxes(
        torch.tensor([[x, y, x + w, y + h] for _, (x, y, w, h) in boxes], dtype=torch.float32)
    )
    instances.scores = torch.ones(len(boxes))
    instances.pred_classes = torch.tensor([c - 1 for c, _ in boxes])
    return {"instances": instances}


def _ap(evaluator, image_ids):
    evaluator.reset()
    for i in image_ids:
        evaluator.process([{"image_id": i, "height": 64, "width": 64}], [_oracle(i)])
    return evaluator.evaluate()["bbox"]["AP"]


def test_left_out_images_do_not_count_as_misses(dataset, caplog):
    ours = EvaluatedImagesCOCOEvaluator(dataset, tasks=("bbox",), distributed=False)
    plain = COCOEvaluator(dataset, tasks=("bbox",), distributed=False)
    with caplog.at_level(logging.WARNING, logger="dcnv2.engine.evaluation"):
        assert _ap(ours, [1, 2]) == pytest.approx(100.0)
    assert "Evaluated 2 of the 3 images of _evaluated_images_test" in caplog.text
    assert "over these 2 images only (1 left out)" in caplog.text
    # detectron2's evaluator counts image 3's two boxes as missed.
    assert _ap(plain, [1, 2]) < 90.0


def test_every_image_evaluated_scores_the_whole_dataset(dataset, caplog):
    ours = EvaluatedImagesCOCOEvaluator(dataset, tasks=("bbox",), distributed=False)
    plain = COCOEvaluator(dataset, tasks=("bbox",), distributed=False)
    with caplog.at_level(logging.WARNING, logger="dcnv2.engine.evaluation"):
        assert _ap(ours, [1, 2, 3]) == pytest.approx(100.0) == _ap(plain, [1, 2, 3])
    assert "Evaluated" not in caplog.text
    # Image 3 evaluated without predictions: a miss, as in detectron2 (it was not left out).
    ours.reset()
    for i in (1, 2):
        ours.process([{"image_id": i}], [_oracle(i)])
    ours.process(
        [{"image_id": 3}],
        [
            {
                "instances": Instances(
                    (64, 64),
                    pred_boxes=Boxes(torch.zeros(0, 4)),
                    scores=torch.zeros(0),
                    pred_classes=torch.zeros(0, dtype=torch.long),
                )
            }
        ],
    )
    assert ours.evaluate()["bbox"]["AP"] < 90.0


def _nothing(image_id):
    return {
        "instances": Instances(
            (64, 64),
            pred_boxes=Boxes(torch.zeros(0, 4)),
            scores=torch.zeros(0),
            pred_classes=torch.zeros(0, dtype=torch.long),
        )
    }


def test_no_detections_is_said_plainly_before_the_nan_metrics(dataset, tmp_path, caplog):
    from dcnv2.engine import Trainer

    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    evaluator = Trainer.build_evaluator(cfg, dataset)  # the YAML Trainer's (the LazyConfig loop
    assert isinstance(evaluator, DatasetEvaluators)  # wraps its evaluator the same way)
    with caplog.at_level(logging.WARNING):
        evaluator.reset()
        for i in BOXES:
            evaluator.process([{"image_id": i, "height": 64, "width": 64}], [_nothing(i)])
        results = evaluator.evaluate()
    assert math.isnan(results["bbox"]["AP"])
    ours = [r.getMessage() for r in caplog.records if r.name == "dcnv2.engine.evaluation"]
    assert ours == [
        "The model predicted no object above its score threshold on the 3 evaluated images, so "
        "the metrics below are NaN: expected early in training (few iterations, or random "
        "weights); otherwise check the weights evaluated"
    ]
    assert caplog.text.index("predicted no object") < caplog.text.index("No predictions")

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        evaluator.reset()
        evaluator.process([{"image_id": 1, "height": 64, "width": 64}], [_oracle(1)])
        evaluator.process([{"image_id": 2, "height": 64, "width": 64}], [_nothing(2)])
        evaluator.evaluate()
    assert "predicted no object" not in caplog.text
