"""dcnv2.data.synthetic: the generated COCO-format dataset behind the embedded default run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from dcnv2.data import check_datasets
from dcnv2.data import synthetic as syn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM = 6  # the last image is the empty one


def _load(out_dir):
    with open(os.path.join(out_dir, "annotations.json"), "rb") as f:
        raw = f.read()
    return raw, json.loads(raw)


def _pixels(out_dir, file_name):
    return np.asarray(Image.open(os.path.join(out_dir, "images", file_name)).convert("RGB"))


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("synthetic") / "split")
    syn.generate_synthetic_coco(out_dir, NUM, seed=7)
    return out_dir


def test_same_seed_same_json_and_pixels_other_seed_differs(generated, tmp_path):
    again, other = str(tmp_path / "again"), str(tmp_path / "other")
    syn.generate_synthetic_coco(again, NUM, seed=7)
    syn.generate_synthetic_coco(other, NUM, seed=8)
    raw, coco = _load(generated)
    assert _load(again)[0] == raw
    assert _load(other)[0] != raw
    for im in coco["images"]:
        np.testing.assert_array_equal(
            _pixels(again, im["file_name"]), _pixels(generated, im["file_name"])
        )


def test_images_have_odd_varied_sizes_and_the_last_has_no_objects(generated):
    _, coco = _load(generated)
    sizes = {(im["height"], im["width"]) for im in coco["images"]}
    assert len(sizes) > 1 and any(h != w for h, w in sizes)
    for im in coco["images"]:
        assert 160 <= im["height"] <= 256 and 160 <= im["width"] <= 256
        assert _pixels(generated, im["file_name"]).shape == (im["height"], im["width"], 3)
    per_image = {im["id"]: 0 for im in coco["images"]}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]] += 1
    last = coco["images"][-1]["id"]
    assert per_image[last] == 0
    assert all(n >= 1 for i, n in per_image.items() if i != last)


def test_annotations_match_the_drawn_pixels(generated):
    _, coco = _load(generated)
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    colours = {c["id"]: np.array(syn.CATEGORIES[c["id"] - 1][1]) for c in coco["categories"]}
    assert [c["name"] for c in coco["categories"]] == ["rectangle", "ellipse", "triangle"]
    for ann in coco["annotations"]:
        img = _pixels(generated, files[ann["image_id"]]).astype(int)
        x, y, w, h = ann["bbox"]
        is_obj = np.abs(img - colours[ann["category_id"]]).max(axis=2) <= syn._COLOUR_JITTER + 1
        # Objects are 4+ px apart, so a 2 px ring around the box holds only this object's pixels.
        x0, y0 = max(int(x) - 2, 0), max(int(y) - 2, 0)
        window = is_obj[y0 : int(y + h) + 2, x0 : int(x + w) + 2]
        ys, xs = np.nonzero(window)
        drawn = (xs.min() + x0, ys.min() + y0, xs.max() + x0 + 1, ys.max() + y0 + 1)
        np.testing.assert_allclose(drawn, (x, y, x + w, y + h), atol=1.0)
        assert is_obj[int(y + h / 2), int(x + w / 2)], "the box centre lies inside every shape"
        assert window.sum() == pytest.approx(ann["area"], rel=0.2)
        poly = np.array(ann["segmentation"][0]).reshape(-1, 2)
        assert len(poly) >= 3 and ann["iscrowd"] == 0
        np.testing.assert_allclose([*poly.min(0), *poly.max(0)], [x, y, x + w, y + h], atol=0.01)
    # Nothing in the background passes for an object colour.
    empty = _pixels(generated, files[coco["images"][-1]["id"]]).astype(int)
    for colour in colours.values():
        assert (np.abs(empty - colour).max(axis=2) > 2 * syn._COLOUR_JITTER).all()


def test_default_datasets_registered_with_coco_metadata():
    root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    for split in ("train", "val"):
        name = f"dcnv2_synthetic_{split}"
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "coco"
        assert meta.thing_classes == ["rectangle", "ellipse", "triangle"]
        assert callable(meta.prepare)
        folder = syn.synthetic_split_dir(root, split, *syn.SPLITS[split])
        assert meta.json_file == os.path.join(folder, "annotations.json")
        assert meta.image_root == os.path.join(folder, "images")


def test_import_generates_nothing(tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path))
    code = (
        "import dcnv2; from detectron2.data import MetadataCatalog; "
        "print(MetadataCatalog.get('dcnv2_synthetic_val').json_file)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().startswith(str(tmp_path / "dcnv2_synthetic"))
    assert os.listdir(tmp_path) == []


def test_check_datasets_generates_and_the_loader_reads_it(tmp_path):
    name = "_test_dcnv2_synthetic_tiny"
    syn.register_synthetic_dataset(name, str(tmp_path), "tiny", 4, seed=3)
    try:
        meta = MetadataCatalog.get(name)
        assert not os.path.exists(meta.json_file)
        check_datasets([name])
        assert os.path.isfile(meta.json_file)
        records = DatasetCatalog.get(name)
        assert len(records) == 4 and records[-1]["annotations"] == []
        for r in records:
            assert os.path.isfile(r["file_name"])
            assert r["file_name"].startswith(meta.image_root)
            for ann in r["annotations"]:
                assert 0 <= ann["category_id"] < 3  # contiguous ids, as detectron2 trains on
                assert len(ann["segmentation"][0]) >= 6
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_second_prepare_reuses_the_folder(tmp_path, monkeypatch):
    out_dir = syn.prepare_synthetic_split(str(tmp_path), "val", 3, seed=1)
    stamp = os.stat(os.path.join(out_dir, "annotations.json")).st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("regenerated a cached split")

    monkeypatch.setattr(syn, "generate_synthetic_coco", must_not_run)
    assert syn.prepare_synthetic_split(str(tmp_path), "val", 3, seed=1) == out_dir
    assert os.stat(os.path.join(out_dir, "annotations.json")).st_mtime_ns == stamp
    assert os.listdir(os.path.dirname(out_dir)) == [os.path.basename(out_dir)]


def test_changed_parameters_or_generator_regenerate(tmp_path, monkeypatch):
    root = str(tmp_path)
    first = syn.prepare_synthetic_split(root, "val", 3, seed=1)
    other_params = syn.prepare_synthetic_split(root, "val", 3, seed=2)
    monkeypatch.setattr(syn, "_CODE_HASH", "a different generator")
    other_code = syn.prepare_synthetic_split(root, "val", 3, seed=1)
    assert len({first, other_params, other_code}) == 3
    for folder in (first, other_params, other_code):
        assert os.path.isfile(os.path.join(folder, "annotations.json"))


def test_losing_a_generation_race_keeps_the_winners_copy(tmp_path, monkeypatch):
    root = str(tmp_path)
    out_dir = syn.synthetic_split_dir(root, "val", 3, 1)
    generate = syn.generate_synthetic_coco

    def generate_while_another_process_finishes_first(work_dir, *args, **kwargs):
        generate(out_dir, *args, **kwargs)  # the other process's copy, renamed into place
        generate(work_dir, *args, **kwargs)

    monkeypatch.setattr(
        syn, "generate_synthetic_coco", generate_while_another_process_finishes_first
    )
    assert syn.prepare_synthetic_split(root, "val", 3, seed=1) == out_dir
    # No temporary folder is left behind, and the split is complete.
    assert os.listdir(os.path.dirname(out_dir)) == [os.path.basename(out_dir)]
    assert len(_load(out_dir)[1]["images"]) == 3


def test_bad_number_of_images_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="num_images must be >= 1"):
        syn.generate_synthetic_coco(str(tmp_path / "x"), 0, seed=0)


def test_cli_generates_both_splits_and_rejects_empty_ones(tmp_path):
    script = os.path.join(REPO, "tools", "generate_synthetic_dataset.py")
    args = [sys.executable, script, "--root", str(tmp_path), "--num-train", "3", "--num-val", "2"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    folders = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert folders == {
        "train": syn.synthetic_split_dir(str(tmp_path), "train", 3, 0),
        "val": syn.synthetic_split_dir(str(tmp_path), "val", 2, 1),
    }
    assert len(_load(folders["val"])[1]["images"]) == 2
    bad = subprocess.run(args[:-1] + ["0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--num-val must be >= 1" in bad.stderr
