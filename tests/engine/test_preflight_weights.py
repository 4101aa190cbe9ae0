"""``MODEL.WEIGHTS`` must name a regular file: a folder or a device file is refused by the
preflight checks (before any model or output file), with what it is and what was expected."""

import os

import pytest
import torch

from dcnv2 import get_cfg
from dcnv2.config import LAZY_KEYS
from dcnv2.engine import preflight as preflight_mod
from dcnv2.engine.preflight import check_weights, preflight
from dcnv2.errors import DCNv2Error, WeightsError


def _preflight(weights, output_dir):
    opts = ["MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(output_dir)]
    opts += ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()"]
    cfg = get_cfg("quick/faster_rcnn_R50_mdconv_FPN_instant.yaml", opts)
    preflight(cfg, num_gpus=1, resume=False, eval_only=False)


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
@pytest.mark.parametrize("kind", ["folder", "device"])
def test_a_folder_or_a_device_file_as_weights_is_refused(tmp_path, kind):
    weights = tmp_path / "weights.pth" if kind == "folder" else "/dev/null"
    if kind == "folder":
        weights.mkdir()
    output_dir = tmp_path / "out"
    with pytest.raises(WeightsError) as info:
        _preflight(weights, output_dir)
    assert isinstance(info.value, DCNv2Error)
    what = "is a folder" if kind == "folder" else "is not a regular file"
    assert f"Weights file {weights} (given by MODEL.WEIGHTS) {what}; expected a" in str(info.value)
    assert not output_dir.exists()  # refused before the output folder is made
    with pytest.raises(WeightsError, match=r"given by train.init_checkpoint\) " + what):
        check_weights(str(weights), LAZY_KEYS)


def test_a_regular_file_passes_and_urls_are_left_for_later(tmp_path, monkeypatch):
    # The control for the test above: the same checks accept a file (whether its tensors fit
    # the model is check_weights_fit's job, tested with the bad-input tests).
    monkeypatch.setattr(preflight_mod, "check_weights_fit", lambda cfg: None)
    weights = tmp_path / "weights.pth"
    # A whole torch.save file (the bytes of an empty, text or truncated one are refused here:
    # tests/reliability/test_bad_weights_files.py).
    torch.save({"model": {}}, weights)
    _preflight(weights, tmp_path / "out")
    assert (tmp_path / "out").is_dir()
    check_weights("detectron2://ImageNetPretrained/MSRA/R-50.pkl")
    check_weights("")
