"""Shared pieces of the reliability tests: a tiny COCO-format dataset, the tiny config's settings
for them, and ways to run train_net.py (in this process, or as a subprocess with injected faults).
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.ops.boxes as box_ops
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = os.path.join(REPO, "configs", "quick", "faster_rcnn_R50_mdconv_FPN_instant.yaml")
FAULTY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faulty_train_net.py")
DATASET = "_reliability_tiny"

# Added to the shared tiny_opts (tests/conftest.py): the tiny dataset, 64x64 images (never
# resized), a narrow network with frozen BN (GroupNorm needs 32 channels), no sampling randomness
# (every anchor and every proposal sampled, so each image weighs the same in a batch of 2 as on
# its own process), 4 iterations with checkpoints after iterations 1 and 3. The random flip stays:
# data order and augmentation both have to be reproduced on resume.
RELIABILITY_OPTS = [
    "DATASETS.TRAIN", f"('{DATASET}',)", "DATASETS.TEST", "()",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.FPN.NORM", "",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.RESNETS.WIDTH_PER_GROUP", "8",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "32", "MODEL.FPN.OUT_CHANNELS", "16",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "100000", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "20", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "1000",
    "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2",
    "SOLVER.BASE_LR", "0.01", "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "(3,)",
    "SOLVER.CLIP_GRADIENTS.ENABLED", "False",
]  # fmt: skip
TINY: list = []  # tiny_opts + RELIABILITY_OPTS, set by the ``rel`` fixture


def write_tiny_coco(root: str, num_images: int = 6, seed: int = 0) -> tuple:
    """``num_images`` 64x64 PNGs with 2 coloured boxes each, and their COCO json.

    Returns:
        (json_file, image_root)
    """
    rng = np.random.default_rng(seed)
    image_root = os.path.join(root, "images")
    os.makedirs(image_root, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        pixels = rng.integers(90, 160, size=(64, 64, 3), dtype=np.uint8)
        for k, (x, y) in enumerate([(4, 6), (34, 30)]):
            w, h = int(rng.integers(14, 26)), int(rng.integers(14, 26))
            pixels[y : y + h, x : x + w] = (220, 40, 40) if k == 0 else (40, 200, 60)
            annotations.append(
                {"id": len(annotations) + 1, "image_id": i + 1, "category_id": k + 1,
                 "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
            )  # fmt: skip
        name = f"{i + 1:03d}.png"
        Image.fromarray(pixels).save(os.path.join(image_root, name))
        images.append({"id": i + 1, "file_name": name, "height": 64, "width": 64})
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": 1, "name": "red"},
            {"id": 2, "name": "green"},
            {"id": 3, "name": "x"},
        ],
    }
    json_file = os.path.join(root, "annotations.json")
    with open(json_file, "w") as f:
        json.dump(coco, f)
    return json_file, image_root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """The tiny dataset, registered as ``DATASET`` in this process; (json_file, image_root)."""
    json_file, image_root = write_tiny_coco(str(tmp_path_factory.mktemp("tiny_coco")))
    register_coco_instances(DATASET, {}, json_file, image_root)
    yield json_file, image_root
    DatasetCatalog.remove(DATASET)
    MetadataCatalog.remove(DATASET)


def _import(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


faulty = _import("dcnv2_faulty_train_net", FAULTY)  # its helpers; imported, it injects nothing


def import_train_net():
    # By path: the repository root is not a package to import from.
    spec = importlib.util.spec_from_file_location(
        "dcnv2_train_net_under_test", os.path.join(REPO, "train_net.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def train_net():
    return import_train_net()


def run_faulty(args, tiny_dataset, env=None, timeout=600, new_session=False):
    """train_net.py with faults (see faulty_train_net.py) in a subprocess (in a process group
    of its own with ``new_session``); returns the process."""
    json_file, image_root = tiny_dataset
    full_env = dict(os.environ, DCNV2_TEST_DATASET=f"{DATASET},{json_file},{image_root}")
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, FAULTY, *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=new_session,
    )


def run_in_process(train_net, argv, env=None):
    """``train_net.invoke_main(argv)`` in this process with the faults of ``env`` (the
    variables of faulty_train_net.py), undone afterwards."""
    env = env or {}

    class FaultyTrainer(train_net.Trainer):
        @classmethod
        def build_model(cls, cfg):
            return faulty.faulty_model(super().build_model(cfg), env)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_net, "Trainer", FaultyTrainer)
        if env.get("DCNV2_TEST_FLOAT64") == "1":
            mp.setattr(box_ops, "nms", faulty.float64_nms)
        train_net.invoke_main(list(argv))


def tiny_args(output_dir, *opts, flags=()):
    if "--num-gpus" in flags and "--dist-url" not in flags:
        # A free port: detectron2's default port is fixed per user, so runs started at the same
        # time (or one still closing its socket) would collide (EADDRINUSE).
        flags = [*flags, "--dist-url", "auto"]
    return [*flags, "--config-file", QUICK, *TINY, "OUTPUT_DIR", str(output_dir), *opts]


FLOAT64 = {"DCNV2_TEST_FLOAT64": "1"}


@pytest.fixture(scope="session")
def reference_run(rel, train_net, tiny_dataset, tmp_path_factory):
    """Output folder of an uninterrupted 1-process float64 run of the tiny config (4 iterations,
    checkpoints after iterations 1 and 3)."""
    out = tmp_path_factory.mktemp("reference")
    run_in_process(train_net, tiny_args(out), FLOAT64)
    return str(out)


def final_weights(output_dir: str, name: str = "model_final.pth") -> dict:
    return torch.load(os.path.join(output_dir, name), map_location="cpu", weights_only=True)[
        "model"
    ]


def assert_same_weights(actual: dict, expected: dict, rtol: float = 0.0, atol: float = 0.0):
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=rtol, atol=atol)


def weights_moved(after: dict, before: dict) -> float:
    """Norm of the update between two state dicts (to check a comparison is not vacuous)."""
    return (
        sum(
            (after[k].double() - before[k].double()).pow(2).sum().item()
            for k in after
            if after[k].is_floating_point()
        )
        ** 0.5
    )


@pytest.fixture(scope="session")
def rel(tiny_opts):
    """This module's helpers, for the tests (pytest's importlib mode cannot import conftest), with
    :data:`TINY` set."""
    TINY[:] = [*tiny_opts, *RELIABILITY_OPTS]
    return sys.modules[__name__]
