"""tools/browse_dataset.py and dcnv2.tools.browse_dataset on a small synthetic training split: the
boxes drawn are the annotations moved by the training augmentations (resize, random flip)."""

import importlib.util
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image

from dcnv2.errors import UserInputError
from dcnv2.tools.browse_dataset import browse_dataset
from dcnv2.tools.cli import run_cli, setup_cfg
from dcnv2.tools.visualize_results import TITLE_HEIGHT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = "quick/faster_rcnn_R50_mdconv_FPN_instant.yaml"
NAME = "_test_browse_dataset_train"
SHORT = 96  # INPUT.MIN_SIZE_TRAIN below


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    from dcnv2.data.synthetic import register_synthetic_dataset

    register_synthetic_dataset(NAME, str(tmp_path_factory.mktemp("synthetic")), "train", 6, 0)
    opts = ["MODEL.WEIGHTS", "", "DATASETS.TRAIN", f"('{NAME}',)"]
    opts += ["INPUT.MIN_SIZE_TRAIN", f"({SHORT},)", "INPUT.MAX_SIZE_TRAIN", "1000"]
    yield setup_cfg(QUICK, opts)
    DatasetCatalog.remove(NAME)
    MetadataCatalog.remove(NAME)


def _expected_boxes(record, height, width):
    """The record's boxes resized to (height, width), unflipped and flipped horizontally."""
    boxes = np.array(
        [
            BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
            for a in record["annotations"]
        ],
        dtype=np.float64,
    ).reshape(-1, 4)
    sx, sy = width / record["width"], height / record["height"]
    scaled = boxes * np.array([sx, sy, sx, sy])
    flipped = scaled.copy()
    flipped[:, [0, 2]] = width - scaled[:, [2, 0]]
    return scaled, flipped


def test_drawn_boxes_are_the_augmented_annotations(cfg, tmp_path):
    summary = browse_dataset(cfg, str(tmp_path / "out"), num=5, seed=3)
    images = summary["images"]
    assert len(images) == 5 and len(os.listdir(tmp_path / "out")) == 5
    flips = []
    for item in images:
        record = next(
            r
            for r in DatasetCatalog.get(NAME)
            if os.path.basename(r["file_name"]) == os.path.basename(item["file"])
        )
        picture = Image.open(item["file"])
        width, height = picture.size
        assert min(width, height) == SHORT  # resized as INPUT.MIN_SIZE_TRAIN says
        instances = item["instances"]
        got = instances.gt_boxes.tensor.numpy()
        scaled, flipped = _expected_boxes(record, height, width)
        assert got.shape == scaled.shape and len(got) > 0
        same = np.allclose(got, scaled, atol=1e-3)
        mirrored = np.allclose(got, flipped, atol=1e-3)
        assert same or mirrored, (got, scaled, flipped)
        flips.append(mirrored and not same)
        classes = [a["category_id"] for a in record["annotations"]]  # contiguous in the dicts
        assert instances.gt_classes.tolist() == classes
    assert any(flips) and not all(flips), "seed 3 flips some images, not all: flip is random"


def test_tool_writes_num_pictures_with_the_original_beside(cfg, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "dcnv2_tool_browse_dataset", os.path.join(ROOT, "tools", "browse_dataset.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "out"
    argv = ["--config-file", QUICK, "--output", str(out), "--num", "2", "--show-original"]
    argv += ["--dataset", NAME, "--opts", "INPUT.MIN_SIZE_TRAIN", f"({SHORT},)"]
    assert run_cli(tool.main, argv) == 0
    assert "2 picture(s)" in capsys.readouterr().out
    records = [r for r in DatasetCatalog.get(NAME) if r["annotations"]][:2]  # as training
    assert sorted(os.listdir(out)) == sorted(os.path.basename(r["file_name"]) for r in records)
    for record in records:
        picture = np.asarray(Image.open(out / os.path.basename(record["file_name"])))
        height, width = picture.shape[:2]
        resized_width = round(record["width"] * SHORT / min(record["height"], record["width"]))
        assert abs(width - (record["width"] + resized_width)) <= 1
        assert height == max(record["height"], SHORT) + TITLE_HEIGHT  # "original", "as trained"
        for strip in (picture[:TITLE_HEIGHT, : record["width"]], picture[:TITLE_HEIGHT, -SHORT:]):
            assert (strip < 128).any()
    assert run_cli(tool.main, argv, prog="browse_dataset.py") == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err
    with pytest.raises(UserInputError, match="--num must be at least 1"):
        browse_dataset(cfg, str(tmp_path / "none"), num=0)
