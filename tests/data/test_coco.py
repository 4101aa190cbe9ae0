"""The user's COCO datasets named in the config (DATASETS.DCNV2.COCO): registration, its errors,
and train_net.py training and evaluating on them with no Python written."""

import json
import os
import re
import subprocess
import sys

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from dcnv2 import get_cfg
from dcnv2.config import load_config
from dcnv2.data.coco import register_coco_datasets, register_config_datasets
from dcnv2.data.synthetic import generate_synthetic_coco
from dcnv2.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The json's own category ids, not 1..K: evaluation and the results file must keep them.
CATEGORY_IDS = {1: 7, 2: 9, 3: 11}


def _write_split(folder, num_images, seed):
    generate_synthetic_coco(str(folder), num_images, seed)
    path = folder / "annotations.json"
    coco = json.loads(path.read_text())
    for item in coco["annotations"]:
        item["category_id"] = CATEGORY_IDS[item["category_id"]]
    for item in coco["categories"]:
        item["id"] = CATEGORY_IDS[item["id"]]
    path.write_text(json.dumps(coco))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_data")
    _write_split(root / "train", 6, 0)
    _write_split(root / "val", 4, 1)
    return root


@pytest.fixture
def forget():
    names = []
    yield names
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_registers_once_with_absolute_paths_and_the_json_ids(data_dir, forget, monkeypatch):
    monkeypatch.chdir(data_dir)
    triples = (("_t_coco_val", "val/annotations.json", "val/images"),)
    forget.append("_t_coco_val")
    assert register_coco_datasets(triples) == ["_t_coco_val"]
    assert register_coco_datasets(triples) == ["_t_coco_val"]  # every process registers
    meta = MetadataCatalog.get("_t_coco_val")
    assert meta.json_file == str(data_dir / "val" / "annotations.json")
    assert meta.image_root == str(data_dir / "val" / "images")
    dicts = DatasetCatalog.get("_t_coco_val")
    assert len(dicts) == 4
    assert meta.thing_dataset_id_to_contiguous_id == {7: 0, 9: 1, 11: 2}


def test_yaml_command_line_and_lazy_keys(data_dir, forget):
    val = ("_t_coco_cli", str(data_dir / "val" / "annotations.json"), str(data_dir / "val/images"))
    forget.append("_t_coco_cli")
    cfg = get_cfg(
        "quick/faster_rcnn_R50_mdconv_FPN_instant.yaml", ["DATASETS.DCNV2.COCO", repr((val,))]
    )
    assert register_config_datasets(cfg) == ["_t_coco_cli"]
    lazy = load_config(
        "lazy/faster_rcnn_R50_mdconv_FPN_1x.py", [f"dataloader.coco_datasets=[{list(val)!r}]"]
    )
    assert register_config_datasets(lazy) == ["_t_coco_cli"]
    assert "_t_coco_cli" in DatasetCatalog.list()


@pytest.mark.parametrize(
    "entries, expected",
    [
        (("a", "b", "c"), "has 'a'; expected (name, json_file, image_root) triples"),
        ((("a", "val/annotations.json"),), "has ('a', 'val/annotations.json'); expected"),
        ((("a", "nope.json", "val/images"),),
         "the annotation file of 'a', {root}/nope.json, does not exist"),
        ((("a", "val/annotations.json", "nope"),),
         "the image folder of 'a', {root}/nope, does not exist"),
        ((("coco_2017_val", "val/annotations.json", "val/images"),),
         "dataset name 'coco_2017_val' is already registered with other files"),
        ((("a", "val/annotations.json", "val/images"),) * 2, "names dataset 'a' twice"),
        ("abc", "is 'abc'; expected"),
    ],
)  # fmt: skip
def test_bad_triples_are_config_errors(data_dir, monkeypatch, entries, expected):
    monkeypatch.chdir(data_dir)
    before = set(DatasetCatalog.list())
    with pytest.raises(ConfigError) as e:
        register_coco_datasets(entries)
    assert str(e.value).startswith("DATASETS.DCNV2.COCO")
    assert expected.format(root=data_dir) in str(e.value)
    assert set(DatasetCatalog.list()) == before


def _train_net(args, cwd):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_train_net_trains_and_evaluates_on_own_coco_data(data_dir, tiny_opts):
    coco = "(('my_train','train/annotations.json','train/images/'),"
    coco += "('my_val','val/annotations.json','val/images/'))"
    opts = ["DATASETS.DCNV2.COCO", coco, "DATASETS.TRAIN", "('my_train',)"]
    opts += ["DATASETS.TEST", "('my_val',)", "MODEL.ROI_HEADS.NUM_CLASSES", "3"]
    opts += [
        "SOLVER.MAX_ITER",
        "2",
        "SOLVER.WARMUP_ITERS",
        "2",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
        "0.0",
        "OUTPUT_DIR",
        "out",
    ]
    config = "quick/faster_rcnn_R50_mdconv_FPN_instant.yaml"
    proc = _train_net(["--config-file", config, *tiny_opts, *opts], data_dir)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    rows = re.findall(r"copypaste: (.*)", out)
    assert rows[0] == "Task: bbox", rows
    with open(data_dir / "out" / "inference" / "coco_instances_results.json") as f:
        detections = json.load(f)
    assert detections and {d["category_id"] for d in detections} <= set(CATEGORY_IDS.values())
    assert os.path.isfile(data_dir / "out" / "model_final.pth")


def test_train_net_bad_triple_is_one_error_line(data_dir):
    opts = ["DATASETS.DCNV2.COCO", "(('my_train','missing.json','train/images'),)"]
    proc = _train_net(
        ["--config-file", "quick/faster_rcnn_R50_mdconv_FPN_instant.yaml", *opts], data_dir
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert lines == [
        f"train_net.py: error: DATASETS.DCNV2.COCO: the annotation file of 'my_train', "
        f"{data_dir}/missing.json, does not exist; expected a COCO instances json"
    ], proc.stderr


def test_every_process_registers_in_setup_run(data_dir, forget, tmp_path):
    # launch's workers start empty: train_net's setup (setup_run) registers in each of them.
    import argparse

    from dcnv2.engine.setup import setup_run

    val = ("_t_coco_worker", str(data_dir / "val" / "annotations.json"), str(data_dir / "val"))
    forget.append("_t_coco_worker")
    cfg = get_cfg(
        "quick/faster_rcnn_R50_mdconv_FPN_instant.yaml",
        ["DATASETS.DCNV2.COCO", repr((val,)), "OUTPUT_DIR", str(tmp_path)],
    )
    assert "_t_coco_worker" not in DatasetCatalog.list()
    setup_run(cfg, argparse.Namespace(config_file="", eval_only=True))
    assert MetadataCatalog.get("_t_coco_worker").json_file == val[1]
