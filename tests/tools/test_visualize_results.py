"""tools/visualize_results.py and dcnv2.tools.visualize_results on a small synthetic split, with
a results file made from its ground truth (known boxes and scores)."""

import importlib.util
import json
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from dcnv2.errors import UserInputError
from dcnv2.tools.cli import run_cli
from dcnv2.tools.visualize_results import (
    TITLE_HEIGHT,
    dataset_from_json,
    load_results,
    results_config_file,
    results_to_instances,
    titled_panels,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAME = "_test_visualize_results_val"


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A 4-image synthetic split registered as NAME; (annotations json, image folder)."""
    from dcnv2.data.synthetic import prepare_synthetic_split, register_synthetic_dataset

    root = str(tmp_path_factory.mktemp("synthetic"))
    register_synthetic_dataset(NAME, root, "val", 4, 1)
    folder = prepare_synthetic_split(root, "val", 4, 1)
    yield os.path.join(folder, "annotations.json"), os.path.join(folder, "images")
    DatasetCatalog.remove(NAME)
    MetadataCatalog.remove(NAME)


@pytest.fixture(scope="module")
def results(split, tmp_path_factory):
    """Every ground-truth box as a detection, scores cycling through 0.2, 0.45, 0.7, 0.95,
    and one detection of an image id the dataset does not have; (path, list)."""
    with open(split[0]) as f:
        gt = json.load(f)
    scores = [0.2, 0.45, 0.7, 0.95]
    found = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
         "score": scores[i % 4]}
        for i, a in enumerate(gt["annotations"])
    ]  # fmt: skip
    found.append({"image_id": 999, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.99})
    path = tmp_path_factory.mktemp("run") / "inference" / "coco_instances_results.json"
    path.parent.mkdir()
    path.write_text(json.dumps(found))
    return str(path), found


def _tool():
    spec = importlib.util.spec_from_file_location(
        "dcnv2_tool_visualize_results", os.path.join(ROOT, "tools", "visualize_results.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _expected(found, image_id, threshold):
    return sum(1 for r in found if r["image_id"] == image_id and r["score"] >= threshold)


@pytest.mark.parametrize("threshold", [0.5, 0.0])
def test_one_side_by_side_picture_per_image(split, results, tmp_path, threshold, capsys):
    path, found = results
    out = tmp_path / "vis"
    argv = ["--results", path, "--dataset", NAME, "--output", str(out)]
    assert run_cli(_tool().main, [*argv, "--conf-threshold", str(threshold)]) == 0
    with open(split[0]) as f:
        gt = json.load(f)
    assert sorted(os.listdir(out)) == sorted(img["file_name"] for img in gt["images"])
    for img in gt["images"]:
        picture = np.asarray(Image.open(out / img["file_name"]).convert("RGB"))
        assert picture.shape == (img["height"] + TITLE_HEIGHT, 2 * img["width"], 3)
        for half in (
            picture[:TITLE_HEIGHT, : img["width"]],
            picture[:TITLE_HEIGHT, img["width"] :],
        ):
            assert (half < 128).any(), "no title over a half"
    printed = capsys.readouterr().out
    kept = sum(1 for r in found if r["image_id"] != 999 and r["score"] >= threshold)
    assert f"4 picture(s), {kept} detection(s) >= {threshold}" in printed
    assert f"beside {len(gt['annotations'])} ground-truth" in printed
    assert "1 result(s) of images not in the dataset" in printed


def test_threshold_filters_the_instances_given_to_the_visualizer(split, results):
    _, found = results
    dicts, metadata = dataset_from_json(*split)
    by_image = load_results(results[0])
    for record in dicts:
        for threshold in (0.0, 0.45, 0.5, 0.96):
            instances = results_to_instances(
                by_image.get(record["image_id"], []), (64, 64), metadata, threshold
            )
            assert len(instances) == _expected(found, record["image_id"], threshold)
            assert (np.asarray(instances.scores) >= threshold).all()
    # Boxes XYWH -> XYXY, dataset ids -> contiguous ids (synthetic ids 1..3 -> 0..2).
    first = by_image[dicts[0]["image_id"]][0]
    instances = results_to_instances([first], (64, 64), metadata, 0.0)
    x, y, w, h = first["bbox"]
    np.testing.assert_allclose(instances.pred_boxes.tensor[0].tolist(), [x, y, x + w, y + h])
    assert instances.pred_classes.tolist() == [first["category_id"] - 1]


def test_json_and_image_root_and_the_runs_config(split, results, tmp_path):
    path, _ = results
    out = tmp_path / "vis"
    argv = ["--results", path, "--json", split[0], "--image-root", split[1], "--output", str(out)]
    assert run_cli(_tool().main, [*argv, "--max-images", "2"]) == 0
    assert len(os.listdir(out)) == 2
    # Never overwritten without --force.
    assert run_cli(_tool().main, [*argv, "--max-images", "2"]) == 2
    assert run_cli(_tool().main, [*argv, "--max-images", "2", "--force"]) == 0
    # The run's config beside inference/: config_eval.yaml when an eval-only run wrote them.
    run = os.path.dirname(os.path.dirname(path))
    assert results_config_file(path) is None
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write(f"DATASETS:\n  TEST: ('{NAME}',)\n")
    assert results_config_file(path) == os.path.join(run, "config.yaml")
    assert run_cli(_tool().main, ["--results", path, "--output", str(tmp_path / "b")]) == 0
    assert len(os.listdir(tmp_path / "b")) == 4
    open(os.path.join(run, "config_eval.yaml"), "w").close()
    assert results_config_file(path) == os.path.join(run, "config.yaml")  # no record
    open(os.path.join(run, "inference", "evaluated_weights.json"), "w").close()
    assert results_config_file(path) == os.path.join(run, "config_eval.yaml")


def test_demo_json_is_matched_by_file_name(split, results, tmp_path, capsys):
    """tools/demo.py --json numbers the images itself: its detections go to the dataset's images
    of the same file names."""
    _, found = results
    with open(split[0]) as f:
        gt = json.load(f)
    # The demo's own ids, in another order than the dataset's.
    demo_id = {img["id"]: 10 + k for k, img in enumerate(reversed(gt["images"]))}
    demo = {
        "images": [
            {"id": demo_id[img["id"]], "file_name": os.path.join(split[1], img["file_name"])}
            for img in gt["images"]
        ],
        "annotations": [
            dict(r, image_id=demo_id[r["image_id"]]) for r in found if r["image_id"] in demo_id
        ],
    }
    path = tmp_path / "demo.json"
    path.write_text(json.dumps(demo))
    by_name = load_results(str(path))
    for img in gt["images"]:
        assert len(by_name.get(img["file_name"], [])) == _expected(found, img["id"], 0.0)
    argv = ["--results", str(path), "--dataset", NAME, "--output", str(tmp_path / "o")]
    assert run_cli(_tool().main, [*argv, "--conf-threshold", "0.5"]) == 0
    kept = sum(1 for r in found if r["image_id"] in demo_id and r["score"] >= 0.5)
    assert f"4 picture(s), {kept} detection(s)" in capsys.readouterr().out


def test_bad_inputs_are_one_line_errors(split, results, tmp_path, capsys):
    path, _ = results
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "results"}')
    with pytest.raises(UserInputError, match="not a COCO results list"):
        load_results(str(bad))
    dicts, metadata = dataset_from_json(*split)
    with pytest.raises(UserInputError, match=r"category id\(s\) \[7\]"):
        results_to_instances(
            [{"image_id": 1, "category_id": 7, "bbox": [0, 0, 1, 1], "score": 1}],
            (64, 64),
            metadata,
            0.5,
        )
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"image_id": 5000, "category_id": 1, "bbox": [0, 0, 1, 1],
                                  "score": 1.0}]))  # fmt: skip
    argv = ["--results", str(other), "--dataset", NAME, "--output", str(tmp_path / "o")]
    assert run_cli(_tool().main, argv, prog="visualize_results.py") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("visualize_results.py: error: none of the results' image ids")
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_titled_panels_label_each_half():
    left = np.full((30, 50, 3), 90, np.uint8)
    right = np.full((40, 60, 3), 200, np.uint8)
    joined = titled_panels([("detections", left), ("ground truth", right)])
    assert joined.shape == (40 + TITLE_HEIGHT, 110, 3)
    strips = joined[:TITLE_HEIGHT, :50], joined[:TITLE_HEIGHT, 50:]
    for strip in strips:
        assert (strip == 255).mean() > 0.5 and (strip < 128).any()  # dark text on white
    assert not np.array_equal(strips[0], strips[1][:, :50])  # two different titles
    assert (joined[TITLE_HEIGHT:, :50][:30] == 90).all() and (joined[-10:, :50] == 0).all()
    assert (joined[TITLE_HEIGHT:, 50:] == 200).all()
