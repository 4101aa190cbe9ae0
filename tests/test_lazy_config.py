"""LazyConfigs: the shipped ones name dcnv2's data pieces and build on detectron2's model zoo;
overrides of keys the config does not have, and numeric settings a run cannot work with, are
errors naming the key (with the closest valid key for a typo)."""

import os
import re
import subprocess
import sys

import pytest

import dcnv2
from dcnv2.config import check_solver, load_config
from dcnv2.data.mapper import DatasetMapper
from dcnv2.data.resumable import build_resumable_train_loader
from dcnv2.data.test_loader import build_checked_test_loader
from dcnv2.data.validation import load_training_dicts
from dcnv2.errors import ConfigError

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


def test_detectron2_model_zoo_resolves_its_configs():
    from detectron2 import model_zoo

    assert "roi_heads" in model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
    assert os.path.isfile(model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"))


@pytest.mark.parametrize("name", [n for n in dcnv2.list_config_files() if n.endswith(".py")])
def test_shipped_lazy_configs_name_dcnv2s_data_pieces(name):
    cfg = load_config(name, ["train.on_bad_data=skip", "train.seed=5"])
    loader = cfg.dataloader
    assert loader.train.on_bad_data == loader.train.dataset.mode == loader.test.mode == "skip"
    assert loader.train.seed == 5
    assert loader.train._target_ is build_resumable_train_loader
    assert loader.train.dataset._target_ is load_training_dicts
    assert loader.test._target_ is build_checked_test_loader
    assert loader.train.mapper._target_ is DatasetMapper is loader.test.mapper._target_


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_iter=0", "train.max_iter is 0; expected at least 1 iteration"),
        ("optimizer.lr=-0.01", "optimizer.lr is -0.01; expected a finite learning rate >= 0"),
        ("optimizer.lr=nan", "optimizer.lr is nan; expected a finite learning rate >= 0"),
        ("optimizer.weight_decay=-1e-4", "optimizer.weight_decay is -0.0001; expected a finite"),
        ("dataloader.train.total_batch_size=0", "total_batch_size is 0; expected at least 1"),
        ("lr_multiplier.warmup_length=1.5", "warmup_length is 1.5: longer than the run"),
        ("lr_multiplier.scheduler.milestones=[8,6,9]",
         "milestones is (8, 6, 9); expected increasing positive iterations"),
    ],
)  # fmt: skip
def test_numeric_settings_that_cannot_work_are_refused(override, message):
    check_solver(load_config(CONFIG))  # the shipped values pass
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_solver(load_config(CONFIG, [override]))
