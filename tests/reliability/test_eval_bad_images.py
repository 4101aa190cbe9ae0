"""``train_net.py --eval-only`` reads the test images with the training path's handling of bad
data (``DATASETS.DCNV2.ON_BAD_DATA``): "fail" stops before anything is written with one error
line naming the image and what was expected; "skip" evaluates the other images, says how many and
which were left out, and scores the remaining images only."""

import contextlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image


def _empty(path):
    open(path, "wb").close()


def _not_an_image(path):
    with open(path, "w") as f:
        f.write("this is a text file saved with an image's name\n" * 4)


def _other_size(path):
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(path)  # 64x48, annotated 64x64


def _truncated(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _dataset(rel, root, damages):
    """The tiny dataset (6 images of 64x64) with image i+1 damaged by ``damages[i]``."""
    json_file, image_root = rel.write_tiny_coco(str(root), num_images=6)
    for i, damage in enumerate(damages):
        damage(os.path.join(image_root, f"{i + 1:03d}.png"))
    return json_file, image_root


def _eval_argv(rel, json_file, image_root, output_dir, *opts, name="_eval_bad_images"):
    coco = f"(('{name}', '{json_file}', '{image_root}'),)"
    return [*rel.tiny_args(output_dir, flags=["--eval-only"]), "DATASETS.DCNV2.COCO", coco,
            "DATASETS.TRAIN", "()", "DATASETS.TEST", f"('{name}',)",
            "MODEL.WEIGHTS", "", *opts]  # fmt: skip


def _run(rel, argv):
    return subprocess.run(
        [sys.executable, os.path.join(rel.REPO, "train_net.py"), *argv],
        cwd=rel.REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_fail_is_one_error_line_before_anything_is_written(rel, tmp_path):
    json_file, image_root = _dataset(rel, tmp_path / "data", [_empty])
    out = tmp_path / "out"
    proc = _run(rel, _eval_argv(rel, json_file, image_root, out))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("train_net.py: error: Cannot evaluate on dataset ")
    assert f"image {image_root}/001.png is empty (0 bytes); expected an image file" in errors[0]
    assert "set DATASETS.DCNV2.ON_BAD_DATA skip to evaluate on the other images" in errors[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists()


@pytest.mark.parametrize(
    "damage, expected",
    [
        (_not_an_image, "{root}/001.png is not an image file PIL can read ({size} bytes of another "
                        "format); expected a JPEG, PNG or other image file"),
        (_other_size, "image {root}/001.png is 64x48 (width x height) but its annotation gives "
                      "width=64, height=64; expected them equal"),
    ],
    ids=["not-an-image", "other-size"],
)  # fmt: skip
def test_fail_names_the_image_and_what_was_expected(rel, train_net, tmp_path, damage, expected):
    json_file, image_root = _dataset(rel, tmp_path / "data", [damage])
    stderr = io.StringIO()
    name = f"_eval_bad_images_{damage.__name__}"  # registered in this process by the run
    argv = _eval_argv(rel, json_file, image_root, tmp_path / "out", name=name)
    try:
        with pytest.raises(SystemExit) as excinfo, contextlib.redirect_stderr(stderr):
            train_net.invoke_main(argv)
    finally:
        if name in DatasetCatalog:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    assert excinfo.value.code == 2
    message = stderr.getvalue()
    assert message.startswith("train_net.py: error: ") and message.count("\n") == 1, message
    size = os.path.getsize(os.path.join(image_root, "001.png"))
    assert expected.format(root=image_root, size=size) in message
    assert not (tmp_path / "out").exists()


def test_skip_evaluates_the_other_images_and_says_which(rel, tmp_path):
    damages = [_empty, _not_an_image, _other_size, _truncated]  # images 1-4 of 6
    json_file, image_root = _dataset(rel, tmp_path / "data", damages)
    out = tmp_path / "out"
    proc = _run(
        rel, _eval_argv(rel, json_file, image_root, out, "DATASETS.DCNV2.ON_BAD_DATA", "skip")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "log.txt").read_text()
    # Images 1-3 fail the check before inference; image 4 (pixel data cut short) when read.
    names = ", ".join(f"{image_root}/{i:03d}.png" for i in (1, 2, 3))
    assert (
        "Dataset '_eval_bad_images': skipping 3 of its 6 images in evaluation "
        f"(DATASETS.DCNV2.ON_BAD_DATA is 'skip'): {names}." in log
    )
    assert f"Skipping image {image_root}/004.png of dataset '_eval_bad_images'" in log
    assert (
        "Evaluated 2 of the 6 images of _eval_bad_images: the metrics below are over these 2 "
        "images only (4 left out)" in log
    )
    assert "copypaste: AP,AP50,AP75" in log  # evaluation ran to its end
    assert "Traceback" not in proc.stderr


def test_lazy_config_loaders_read_images_with_dcnv2s_mapper_and_checks(rel, tmp_path):
    from detectron2.config import instantiate
    from detectron2.data.datasets import register_coco_instances

    from dcnv2.config import load_config
    from dcnv2.data.mapper import DatasetMapper
    from dcnv2.errors import ImageReadError

    json_file, image_root = _dataset(rel, tmp_path / "data", [_truncated])
    name = "_eval_bad_images_lazy"
    register_coco_instances(name, {}, json_file, image_root)
    try:
        cfg = load_config("lazy/faster_rcnn_R50_mdconv_FPN_1x.py")
        cfg.dataloader.test.update(num_workers=0)
        cfg.dataloader.test.dataset.names = name
        cfg.dataloader.train.update(num_workers=0, total_batch_size=2)
        cfg.dataloader.train.dataset.names = name
        cfg.train.seed = 1
        loader = instantiate(cfg.dataloader.test)
        with pytest.raises(ImageReadError, match=f"Cannot read image {image_root}/001.png of "):
            for _ in loader:
                pass
        train_loader = instantiate(cfg.dataloader.train)
        assert isinstance(train_loader.dataset.mapper, DatasetMapper)
        assert len(train_loader.dataset.dicts) == 6
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
