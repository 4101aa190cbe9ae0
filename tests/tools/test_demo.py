"""tools/demo.py and dcnv2.tools.demo: a random-init detector on generated images and a video."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from dcnv2.errors import UserInputError
from dcnv2.tools.cli import run_cli, setup_cfg
from dcnv2.tools.demo import DemoRunner, collect_inputs, run_demo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "demo.py")
# Random weights, tiny test resolution; threshold 0 so the random detector draws something.
TINY = ["MODEL.WEIGHTS", "", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192"]


def _load_tool():
    spec = importlib.util.spec_from_file_location("dcnv2_tool_demo", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runner():
    cfg = setup_cfg("faster_rcnn_R50_mdconv_FPN_1x.yaml", TINY, confidence_threshold=0.0)
    return DemoRunner(cfg)


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (131, 173, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (97, 149, 3), dtype=np.uint8)).save(folder / "sub/b.jpg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_folder_to_drawings_and_coco_json(runner, images, tmp_path):
    out = tmp_path / "out"
    summary = run_demo(
        runner, collect_inputs([str(images)]), str(out), json_path=str(out / "d.json")
    )
    assert summary["images"] == 2 and summary["detections"] > 0
    original = np.asarray(Image.open(images / "a.png"))
    drawn = np.asarray(Image.open(out / "a.png"))
    assert drawn.shape == original.shape
    assert (drawn != original).any(), "nothing was drawn"
    assert (out / "sub" / "b.jpg").is_file()
    assert not (out / "notes.txt").exists()
    coco = COCO(str(out / "d.json"))
    assert len(coco.getImgIds()) == 2 and len(coco.getAnnIds()) == summary["detections"]
    assert len(coco.loadCats(coco.getCatIds())) == 80
    # COCO category ids of the dataset (1..90 with gaps), not contiguous ids.
    assert {a["category_id"] for a in coco.dataset["annotations"]} <= set(coco.getCatIds())
    ann = coco.dataset["annotations"][0]
    x, y, w, h = ann["bbox"]
    img = coco.loadImgs(ann["image_id"])[0]
    assert 0 <= x and 0 <= y and x + w <= img["width"] + 0.01 and y + h <= img["height"] + 0.01
    assert 0.0 <= ann["score"] <= 1.0


def test_never_overwrites_without_force(runner, images, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"keep me")
    inputs = collect_inputs([str(images / "a.png")])
    with pytest.raises(UserInputError, match="--force"):
        run_demo(runner, inputs, str(out), progress=False)
    assert (out / "a.png").read_bytes() == b"keep me"
    run_demo(runner, inputs, str(out), force=True, progress=False)
    assert Image.open(out / "a.png").size == (173, 131)


def test_video_in_video_out(runner, tmp_path):
    cv2 = pytest.importorskip("cv2")
    video = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (160, 112))
    rng = np.random.default_rng(1)
    for _ in range(3):
        writer.write(rng.integers(0, 255, (112, 160, 3), dtype=np.uint8))
    writer.release()
    out = tmp_path / "out"
    summary = run_demo(
        runner, collect_inputs([video]), str(out), json_path=str(out / "v.json"), progress=False
    )
    capture = cv2.VideoCapture(str(out / "clip.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    assert summary["images"] == 3
    names = [i["file_name"] for i in json.loads((out / "v.json").read_text())["images"]]
    assert names == [f"{video}#{k}" for k in range(3)]


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        collect_inputs([str(tmp_path / "missing.jpg")])
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(UserInputError, match="neither an image"):
        collect_inputs([str(tmp_path / "x.txt")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserInputError, match="holds no image"):
        collect_inputs([str(empty)])
    for sub in ("p", "q"):
        (tmp_path / sub).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / sub / "same.png")
    with pytest.raises(UserInputError, match="both be drawn"):
        collect_inputs([str(tmp_path / "p"), str(tmp_path / "q")])
    with pytest.raises(UserInputError, match="confidence-threshold"):
        setup_cfg("faster_rcnn_R50_mdconv_FPN_1x.yaml", TINY, confidence_threshold=1.5)
    with pytest.raises(UserInputError, match="nope.yaml does not exist"):
        setup_cfg("nope.yaml", TINY)
    with pytest.raises(UserInputError, match="MODEL.WEIGHTS"):
        setup_cfg("faster_rcnn_R50_mdconv_FPN_1x.yaml", ["MODEL.WEIGHTS", "/no/such.pth"])


def test_unreadable_input_fails_before_the_model_is_built(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not a video either")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the inputs were checked")

    monkeypatch.setattr(DemoRunner, "__init__", no_model)
    out = tmp_path / "out"
    for path, message in ((bad, "is not an image file"), (video, "cannot open video")):
        argv = ["--input", str(path), "--output", str(out), "--opts", *TINY]
        assert run_cli(_load_tool().main, argv, prog="demo.py") == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("demo.py: error: ") and message in err and str(path) in err
        assert len(err.splitlines()) == 1
    assert not out.exists()


def test_cli_runs_and_fails_in_one_line(images, tmp_path, capsys):
    tool = _load_tool()
    out = tmp_path / "cli"
    argv = ["--input", str(images / "a.png"), "--output", str(out), "--json", str(out / "d.json")]
    argv += ["--confidence-threshold", "0", "--no-progress", "--opts", *TINY]
    assert tool.main(argv) == 0
    assert (out / "a.png").is_file() and (out / "d.json").is_file()
    assert "1 image(s)" in capsys.readouterr().out
    # A fresh interpreter, as a user runs it: missing input -> one line on stderr, exit 2.
    result = subprocess.run(
        [sys.executable, TOOL, "--input", str(tmp_path / "missing"), "--output", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"demo.py: error: input {str(tmp_path / 'missing')!r} does not exist"
    )


def test_demo_json_scores_against_the_ground_truth_with_the_datasets_ids(tmp_path):
    """The demo's JSON uses the dataset's category ids (1..3 for the synthetic set): an oracle
    detector's file scores AP 100 against the ground truth with pycocotools."""
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import Boxes, Instances
    from pycocotools.cocoeval import COCOeval

    from dcnv2.data.synthetic import prepare_synthetic_split, register_synthetic_dataset

    name = "_test_demo_synthetic_val"
    register_synthetic_dataset(name, str(tmp_path), "val", 4, 1)
    try:
        cfg = setup_cfg(
            "quick/faster_rcnn_R50_mdconv_FPN_instant.yaml",
            [*TINY, "DATASETS.TEST", f"('{name}',)"],
            confidence_threshold=0.0,
        )
        runner = DemoRunner(cfg)  # generates the split (the metadata's prepare step)
        split = prepare_synthetic_split(str(tmp_path), "val", 4, 1)
        gt = COCO(os.path.join(split, "annotations.json"))
        contiguous = {cat: i for i, cat in enumerate(sorted(gt.getCatIds()))}
        by_size = {}
        for img in gt.dataset["images"]:
            anns = gt.loadAnns(gt.getAnnIds(imgIds=img["id"]))
            boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
            classes = [contiguous[a["category_id"]] for a in anns]
            by_size.setdefault((img["height"], img["width"]), []).append((boxes, classes))

        def oracle(image_bgr):  # the ground truth of the image, in the model's contiguous ids
            h, w = image_bgr.shape[:2]
            boxes, classes = by_size[(h, w)][0]
            out = Instances((h, w))
            out.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
            out.scores = torch.ones(len(classes))
            out.pred_classes = torch.tensor(classes, dtype=torch.int64)
            return out

        assert all(len(v) == 1 for v in by_size.values())  # image sizes tell the images apart
        runner.predict = oracle
        inputs = collect_inputs([os.path.join(split, "images")])
        run_demo(runner, inputs, str(tmp_path / "out"), json_path=str(tmp_path / "d.json"))
        demo = json.loads((tmp_path / "d.json").read_text())
        # Score with the ground truth's image ids, matched by file name.
        gt_id = {img["file_name"]: img["id"] for img in gt.dataset["images"]}
        demo_id = {img["id"]: gt_id[os.path.basename(img["file_name"])] for img in demo["images"]}
        results = [dict(a, image_id=demo_id[a["image_id"]]) for a in demo["annotations"]]
        assert {c["id"] for c in demo["categories"]} == set(gt.getCatIds())
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert evaluator.stats[0] > 0.99  # AP over IoU 0.5:0.95
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
