"""``train_net.py --eval-only`` without trained weights refuses, unless the command line sets the
weights empty on purpose (then it warns that a random model is evaluated)."""

import logging

import pytest
import torch
from detectron2.engine import default_argument_parser

from dcnv2.config import load_config
from dcnv2.engine.preflight import check_before_launch, check_eval_weights
from dcnv2.errors import WeightsError

QUICK = "quick/faster_rcnn_R50_mdconv_FPN_instant.yaml"  # MODEL.WEIGHTS ""
IMAGENET = "faster_rcnn_R50_mdconv_FPN_1x.yaml"  # MODEL.WEIGHTS detectron2://ImageNetPretrained/...
LAZY = "lazy/faster_rcnn_R50_mdconv_FPN_1x.py"


def _check(config, tmp_path, *opts, resume=False):
    argv = ["--config-file", config, "--eval-only", "MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "()",
            "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "out"), *opts]  # fmt: skip
    if resume:
        argv.insert(0, "--resume")
    check_before_launch(default_argument_parser().parse_args(argv))


@pytest.mark.parametrize(
    "config, what", [(QUICK, "is empty"), (IMAGENET, "ImageNet backbone weights")]
)
def test_no_trained_weights_is_refused(tmp_path, config, what):
    with pytest.raises(WeightsError, match=f"--eval-only but MODEL.WEIGHTS .*{what}"):
        _check(config, tmp_path)


def test_explicit_empty_weights_evaluate_a_random_model_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dcnv2.engine.preflight"):
        _check(IMAGENET, tmp_path, "MODEL.WEIGHTS", "")
    assert "evaluating a randomly initialised model" in caplog.text


def test_trained_weights_or_a_checkpoint_to_resume_pass(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"model": {}}, out / "model_final.pth")  # a real (if empty) checkpoint
    (out / "last_checkpoint").write_text("model_final.pth")
    with caplog.at_level(logging.WARNING, logger="dcnv2.engine.preflight"):
        check_eval_weights(
            load_config(LAZY, [f"train.init_checkpoint={out / 'model_final.pth'}"]),
            [],
        )
        with pytest.raises(WeightsError):
            _check(QUICK, tmp_path)
        _check(QUICK, tmp_path, resume=True)
    assert "random" not in caplog.text


def test_lazy_config_keys(caplog):
    cfg = load_config(LAZY)
    with pytest.raises(WeightsError, match="train.init_checkpoint is detectron2://ImageNet"):
        check_eval_weights(cfg, [])
    cfg = load_config(LAZY, ['train.init_checkpoint=""'])
    with caplog.at_level(logging.WARNING, logger="dcnv2.engine.preflight"):
        check_eval_weights(cfg, ['train.init_checkpoint=""'])
    assert "train.init_checkpoint empty: evaluating a randomly initialised model" in caplog.text
