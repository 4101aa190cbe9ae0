"""Tools pointed at a run's weights read that run's config.yaml (dcnv2.tools.cli): a tiny "run"
folder (weights + the config.yaml a training run saves) in tmp_path."""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dcnv2.errors import UserInputError, WeightsError
from dcnv2.tools.cli import DEFAULT_CONFIG, choose_config_file, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = "quick/faster_rcnn_R50_mdconv_FPN_instant.yaml"
# The embedded default, narrow and at 64 px: a model that builds and runs in a second.
TINY = [
    "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
    "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.FPN.NORM", "",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.RESNETS.WIDTH_PER_GROUP", "8",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "32", "MODEL.FPN.OUT_CHANNELS", "16",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "32", "TEST.DETECTIONS_PER_IMAGE", "5", "OUTPUT_DIR", "",
]  # fmt: skip


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(
        f"dcnv2_tool_{name}", os.path.join(ROOT, "tools", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run's output folder: model_final.pth and config.yaml (as train_net.py writes
    them), random-init weights of the tiny model."""
    from detectron2.modeling import build_model

    from dcnv2.config import get_cfg

    folder = tmp_path_factory.mktemp("run")
    cfg = get_cfg(QUICK, TINY)
    (folder / "config.yaml").write_text(cfg.dump())
    torch.manual_seed(0)
    model = build_model(cfg)
    torch.save({"model": model.state_dict(), "iteration": 3}, folder / "model_final.pth")
    return folder


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "a.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (71, 93, 3), dtype=np.uint8)).save(path)
    return path


def _demo(tool, image, out, *extra):
    argv = ["--input", str(image), "--output", str(out), "--json", str(out / "d.json")]
    argv += ["--confidence-threshold", "0", "--no-progress", *extra]
    return run_cli(tool.main, argv, prog="demo.py")


def test_demo_without_config_file_uses_the_runs_config(run_dir, image, tmp_path, capsys):
    tool = _load_tool("demo")
    weights = str(run_dir / "model_final.pth")
    assert _demo(tool, image, tmp_path / "a", "--opts", "MODEL.WEIGHTS", weights) == 0
    assert f"using the run's config {run_dir / 'config.yaml'}" in capsys.readouterr().err
    explicit = ["--config-file", str(run_dir / "config.yaml"), "--opts", "MODEL.WEIGHTS", weights]
    assert _demo(tool, image, tmp_path / "b", *explicit) == 0
    assert "using the run's config" not in capsys.readouterr().err
    implicit = json.loads((tmp_path / "a" / "d.json").read_text())
    given = json.loads((tmp_path / "b" / "d.json").read_text())
    assert len(implicit["annotations"]) > 0
    assert implicit["annotations"] == given["annotations"]
    assert (tmp_path / "a" / "a.png").is_file()


def test_mismatching_config_lists_every_tensor_and_the_hint(run_dir, image, tmp_path, capsys):
    tool = _load_tool("demo")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(
        (run_dir / "config.yaml").read_text().replace("NUM_CLASSES: 3", "NUM_CLASSES: 5")
    )
    argv = [
        "--config-file",
        str(wrong),
        "--opts",
        "MODEL.WEIGHTS",
        str(run_dir / "model_final.pth"),
    ]
    assert _demo(tool, image, tmp_path / "out", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("demo.py: error: cannot load MODEL.WEIGHTS")
    assert "4 tensor(s) of the weights" in err
    for name in ("cls_score.weight", "cls_score.bias", "bbox_pred.weight", "bbox_pred.bias"):
        assert f"roi_heads.box_predictor.{name}: " in err
    assert "MODEL.ROI_HEADS.NUM_CLASSES" in err.splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_weights_without_a_run_config_need_config_file(run_dir, tmp_path):
    alone = tmp_path / "published.pth"
    shutil.copy(run_dir / "model_final.pth", alone)
    with pytest.raises(UserInputError, match="no config.yaml beside it.*--config-file"):
        choose_config_file(None, ["MODEL.WEIGHTS", str(alone)])
    with pytest.raises(WeightsError, match="does not exist"):
        choose_config_file(None, ["MODEL.WEIGHTS", str(tmp_path / "missing.pth")])
    # No weights: the tool's default, or an error naming --config-file when it has none.
    assert choose_config_file(None, ["MODEL.DEVICE", "cpu"]) == "faster_rcnn_R50_mdconv_FPN_1x.yaml"
    with pytest.raises(UserInputError, match="pass --config-file"):
        choose_config_file(None, [], default=None)
    random_model = ["MODEL.WEIGHTS", ""]
    assert choose_config_file(None, random_model, default=None) == DEFAULT_CONFIG
    # An explicit config wins over the run's; the last MODEL.WEIGHTS counts.
    weights = str(run_dir / "model_final.pth")
    assert choose_config_file("x.yaml", ["MODEL.WEIGHTS", weights]) == "x.yaml"
    found = choose_config_file(None, ["MODEL.WEIGHTS", str(alone), "MODEL.WEIGHTS", weights])
    assert found == str(run_dir / "config.yaml")


def test_lazy_runs_config_is_refused_in_one_line(tmp_path):
    from detectron2.config import LazyConfig

    from dcnv2.config import load_config

    run = tmp_path / "lazy_run"
    run.mkdir()
    LazyConfig.save(load_config("lazy/faster_rcnn_R50_mdconv_FPN_1x.py"), str(run / "config.yaml"))
    torch.save({"model": {}}, run / "model_final.pth")
    with pytest.raises(UserInputError, match="LazyConfig .*--config-file"):
        choose_config_file(None, ["MODEL.WEIGHTS", str(run / "model_final.pth")])


def test_sampling_and_analysis_tools_use_the_runs_config(run_dir, image, tmp_path, capsys):
    weights = str(run_dir / "model_final.pth")
    sampling = _load_tool("visualize_sampling")
    argv = ["--input", str(image), "--output", str(tmp_path / "s.png"), "--points", "30,20"]
    assert run_cli(sampling.main, [*argv, "--opts", "MODEL.WEIGHTS", weights]) == 0
    assert (tmp_path / "s.png").is_file()
    analysis = _load_tool("analyze_model")
    argv = ["--tasks", "parameter", "--height", "64", "--width", "64"]
    argv += ["--json", str(tmp_path / "a.json"), "--opts", "MODEL.WEIGHTS", weights]
    assert run_cli(analysis.main, argv) == 0
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["config"] == str(run_dir / "config.yaml")
    from detectron2.modeling import build_model

    from dcnv2.config import get_cfg

    tiny = build_model(get_cfg(str(run_dir / "config.yaml")))
    assert report["parameter"] == sum(p.numel() for p in tiny.parameters())  # not the 1x model's
    assert capsys.readouterr().err.count("using the run's config") == 2
