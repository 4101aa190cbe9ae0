"""The environment that tools/setup_env.sh builds runs detectron2's own model zoo (its
``model_zoo`` imports ``pkg_resources``, which setuptools 81 removed)."""

import os

import pytest


@pytest.mark.filterwarnings("ignore:pkg_resources is deprecated")
def test_detectron2_model_zoo_resolves_its_configs():
    from detectron2 import model_zoo

    name = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"
    path = model_zoo.get_config_file(name)
    assert os.path.isfile(path) and path.endswith(os.path.join("configs", name))
    cfg = model_zoo.get_config(name)  # follows _BASE_ into Base-RCNN-FPN.yaml
    assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.MODEL.ROI_HEADS.NAME == "StandardROIHeads"
