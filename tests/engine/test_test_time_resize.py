"""The test-time resize of ``INPUT.DCNV2.RESIZE_BACKEND`` reaches the model: through
``train_net.py --eval-only`` with a ``configs/mmdet`` config (OpenCV, MMDetection's) and through
the demo's predictor (OpenCV with that config, PIL with the default)."""

import importlib.util
import json
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import default_argument_parser
from detectron2.structures import Boxes, Instances
from PIL import Image
from torch import nn

from dcnv2.engine import Trainer
from dcnv2.errors import UserInputError
from dcnv2.tools.cli import setup_cfg
from dcnv2.tools.demo import DemoRunner

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MMDET = os.path.join(REPO, "configs", "mmdet", "faster_rcnn_R50_mdconv_FPN_1x_mmdet.yaml")
DATASET = "_dcnv2_resize_eval"
SIZES = [(300, 451), (97, 131)]  # (h, w): PIL and OpenCV give different pixels for both


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = 127 + 60 * np.sin(x / 7.0)[..., None] * np.cos(y / 5.0)[..., None]
    return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def _mmcv_size(h, w, short=800, long=1333):
    factor = min(long / max(h, w), short / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


@pytest.fixture
def dataset(tmp_path):
    """Two PNG images (RGB arrays by file name) registered as a COCO dataset."""
    images, arrays = [], {}
    for i, (h, w) in enumerate(SIZES):
        name = f"{i}.png"
        arrays[name] = _image(h, w, i)
        Image.fromarray(arrays[name]).save(tmp_path / name)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
    coco = {
        "images": images,
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20],
                         "area": 400, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }  # fmt: skip
    json_file = tmp_path / "coco.json"
    json_file.write_text(json.dumps(coco))
    register_coco_instances(DATASET, {}, str(json_file), str(tmp_path))
    yield arrays
    DatasetCatalog.remove(DATASET)
    MetadataCatalog.remove(DATASET)


class _Recorder(nn.Module):
    """Stands in for the detector: keeps the images it is given, detects nothing."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.inputs = []

    def forward(self, batched_inputs):
        self.inputs += batched_inputs
        empty = {"pred_boxes": Boxes(torch.zeros(0, 4)), "scores": torch.zeros(0),
                 "pred_classes": torch.zeros(0, dtype=torch.int64)}  # fmt: skip
        return [
            {"instances": Instances((x["height"], x["width"]), **empty)} for x in batched_inputs
        ]


def _train_net():
    spec = importlib.util.spec_from_file_location(
        "dcnv2_train_net", os.path.join(REPO, "train_net.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_only_with_an_mmdet_config_feeds_the_model_opencv_resized_images(
    dataset, tmp_path, monkeypatch
):
    recorder = _Recorder()
    monkeypatch.setattr(Trainer, "build_model", classmethod(lambda cls, cfg: recorder))
    argv = ["--config-file", MMDET, "--eval-only", "MODEL.DEVICE", "cpu",
            "DATASETS.TEST", f"('{DATASET}',)", "DATALOADER.NUM_WORKERS", "0",
            "OUTPUT_DIR", str(tmp_path / "out")]  # fmt: skip
    _train_net().main(default_argument_parser().parse_args(argv))
    assert len(recorder.inputs) == len(SIZES)
    for given in recorder.inputs:
        original = dataset[os.path.basename(given["file_name"])]  # RGB, the config's format
        h, w = original.shape[:2]
        new_h, new_w = _mmcv_size(h, w)
        expected = cv2.resize(original, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        assert (given["height"], given["width"]) == (h, w)
        assert torch.equal(given["image"], torch.as_tensor(expected.transpose(2, 0, 1).copy()))
        pil = np.asarray(Image.fromarray(original).resize((new_w, new_h), Image.BILINEAR))
        assert (pil != expected).mean() > 0.05  # the check tells the two apart


def test_eval_loader_of_the_default_config_keeps_detectron2s_resize(dataset):
    from dcnv2 import get_cfg

    opts = ["INPUT.MIN_SIZE_TEST", "120", "DATALOADER.NUM_WORKERS", "0"]
    cfg = get_cfg("faster_rcnn_R50_mdconv_FPN_1x.yaml", opts)
    (given,) = next(iter(Trainer.build_test_loader(cfg, DATASET)))
    original = dataset[os.path.basename(given["file_name"])][:, :, ::-1]  # the config reads BGR
    h, w = original.shape[:2]
    new_h, new_w = given["image"].shape[1:]
    expected = np.asarray(Image.fromarray(original).resize((new_w, new_h), Image.BILINEAR))
    assert torch.equal(given["image"], torch.as_tensor(expected.transpose(2, 0, 1).copy()))


def _captured_input(config_file, image_bgr):
    opts = ["MODEL.WEIGHTS", "", "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "160"]
    runner = DemoRunner(setup_cfg(config_file, opts, confidence_threshold=0.0))
    captured = []
    runner.predictor.model.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    instances = runner.predict(image_bgr)
    assert instances.image_size == image_bgr.shape[:2]  # in the input image's coordinates
    (given,) = captured[0]
    return runner.cfg, given["image"]


def test_demo_predictor_resizes_with_opencv_for_mmdet_and_pil_by_default():
    image_bgr = _image(97, 131, 5)
    new_h, new_w = _mmcv_size(97, 131, 96, 160)
    cfg, given = _captured_input(MMDET, image_bgr)
    assert cfg.INPUT.DCNV2.RESIZE_BACKEND == "opencv" and cfg.INPUT.FORMAT == "RGB"
    rgb = np.ascontiguousarray(image_bgr[:, :, ::-1])
    expected = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    assert torch.equal(given, torch.as_tensor(expected.transpose(2, 0, 1).astype(np.float32)))

    cfg, given = _captured_input("faster_rcnn_R50_mdconv_FPN_1x.yaml", image_bgr)
    assert cfg.INPUT.DCNV2.RESIZE_BACKEND == "pil" and cfg.INPUT.FORMAT == "BGR"
    new_h, new_w = given.shape[1:]
    expected = np.asarray(Image.fromarray(image_bgr).resize((new_w, new_h), Image.BILINEAR))
    assert torch.equal(given, torch.as_tensor(expected.transpose(2, 0, 1).astype(np.float32)))


def test_demo_with_a_bad_resize_backend_is_a_user_error():
    cfg = setup_cfg(MMDET, ["MODEL.WEIGHTS", "", "INPUT.DCNV2.RESIZE_BACKEND", "PIL"])
    with pytest.raises(UserInputError, match="INPUT.DCNV2.RESIZE_BACKEND is 'PIL'; expected one"):
        DemoRunner(cfg)


def test_train_net_refuses_a_bad_resize_backend_before_writing_anything(dataset, tmp_path):
    from dcnv2.data.transforms import ResizeBackendError
    from dcnv2.engine.preflight import check_before_launch

    out = tmp_path / "out"
    argv = ["--config-file", MMDET, "--eval-only", "MODEL.DEVICE", "cpu",
            "DATASETS.TEST", f"('{DATASET}',)", "OUTPUT_DIR", str(out),
            "INPUT.DCNV2.RESIZE_BACKEND", "cv2"]  # fmt: skip
    with pytest.raises(ResizeBackendError, match="RESIZE_BACKEND is 'cv2'; expected one of"):
        check_before_launch(default_argument_parser().parse_args(argv))
    assert not out.exists()
