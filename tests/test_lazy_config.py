"""LazyConfig overrides: a key the config does not have is an error with the closest valid key,
as for YAML configs; constructor arguments left at their defaults and dcnv2's optional keys are
accepted."""

import os
import subprocess
import sys

import pytest

from dcnv2.errors import ConfigError
from dcnv2.lazy_config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "lazy/faster_rcnn_R50_mdconv_FPN_1x.py"


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("train.max_itr=10", "train.max_iter"),
        ("optimizer.lrr=0.1", "optimizer.lr"),
        ("model.roi_heads.box_predictor.test_score_tresh=0",
         "model.roi_heads.box_predictor.test_score_thresh"),
    ],
)  # fmt: skip
def test_unknown_keys_are_errors_with_the_closest_key(override, suggestion):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"Unknown config key {key} .*did you mean {suggestion}?"):
        load_config(CONFIG, [override])


def test_known_defaulted_optional_and_added_keys_apply():
    cfg = load_config(
        CONFIG,
        [
            "train.max_iter=10",  # in the config
            "dataloader.train.num_workers=0",  # a build_detection_train_loader argument
            "train.seed=3",  # optional key dcnv2 reads
            "+train.note=hello",  # added on purpose
        ],
    )
    assert cfg.train.max_iter == 10 and cfg.dataloader.train.num_workers == 0
    assert cfg.train.seed == 3 and cfg.train.note == "hello"


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(CONFIG, ["train.max_iter", "10"])


def test_train_net_typo_is_one_error_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", CONFIG,
         "train.max_itr=10", f"train.output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(
        "train_net.py: error: Unknown config key train.max_itr in 'train.max_itr=10' on the "
        "command line; did you mean train.max_iter?"
    ), proc.stderr
    assert os.listdir(tmp_path) == []
