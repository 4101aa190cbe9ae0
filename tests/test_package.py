"""The installable package: registration on import, shipped configs, dataset checks."""

import os
import subprocess
import sys
import zipfile

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

import dcnv2
from dcnv2.data import DatasetNotFoundError, check_datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(args, **kw):
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, **kw
    )


def test_import_registers_components_in_a_fresh_process():
    code = (
        "from detectron2.data import DatasetCatalog\n"
        "from detectron2.modeling import BACKBONE_REGISTRY as B, ROI_HEADS_REGISTRY as H\n"
        "assert 'build_dcnv2_resnet_fpn_backbone' not in B\n"
        "import dcnv2\n"
        "assert 'build_dcnv2_resnet_fpn_backbone' in B and 'build_dcnv2_resnet_backbone' in B\n"
        "assert 'DCNv2StandardROIHeads' in H\n"
        "assert 'dcnv2_synthetic_train' in DatasetCatalog.list()\n"
        "assert dcnv2.get_cfg is dcnv2.config.get_cfg and dcnv2.__version__\n"
        "assert all(hasattr(dcnv2, name) for name in dcnv2.__all__)\n"
    )
    proc = _python(["-c", code])
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_import_is_quiet():
    # Not vacuous: importing detectron2's modeling by itself prints the jit warning.
    jit = "`torch.jit.script` is deprecated"
    assert jit in _python(["-W", "default", "-c", "import detectron2.modeling"]).stderr
    proc = _python(["-W", "default", "-c", "import dcnv2"])
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]


def test_import_without_detectron2_says_how_to_install_it():
    code = (
        "try:\n"
        "    import dcnv2\n"
        "except ImportError as e:\n"
        "    from dcnv2.errors import DCNv2Error, DependencyMissingError\n"
        "    assert isinstance(e, DependencyMissingError) and isinstance(e, DCNv2Error)\n"
        "    assert e.name == 'detectron2'\n"
        "    print(e)\n"
        "else:\n"
        "    raise SystemExit('imported without detectron2')\n"
    )
    # -S: no site-packages, so no detectron2; dcnv2 from the checkout.
    proc = _python(
        ["-S", "-c", code], env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "projects"))
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    message = proc.stdout.strip()
    assert message.count("\n") == 0
    assert message.startswith(
        f"dcnv2 needs detectron2, which this Python ({sys.executable}) cannot import "
        "(No module named 'detectron2')."
    )
    assert "`bash tools/setup_env.sh`" in message
    assert "build detectron2 from source" in message


def test_every_repository_config_is_shipped_with_the_package():
    in_repo = set()
    for root, _, files in os.walk(os.path.join(ROOT, "configs")):
        for f in files:
            if f.endswith((".yaml", ".py")):
                in_repo.add(os.path.relpath(os.path.join(root, f), os.path.join(ROOT, "configs")))
    assert "faster_rcnn_R50_mdconv_FPN_1x.yaml" in in_repo
    assert in_repo <= set(dcnv2.list_config_files())
    for name in in_repo:
        assert os.path.isfile(dcnv2.get_config_file(name))


def test_unknown_config_name_says_the_close_ones_and_where_the_list_is():
    with pytest.raises(FileNotFoundError) as info:
        dcnv2.get_config_file("faster_rcnn_R50_nothing.yaml")
    assert "did you mean faster_rcnn_R50_FPN_1x.yaml or" in str(info.value)
    assert "dcnv2.list_config_files()" in str(info.value)


def test_get_cfg_has_dcnv2_keys_and_seed_recipe():
    cfg = dcnv2.get_cfg("faster_rcnn_R50_mdconv_FPN_1x.yaml", ["SOLVER.MAX_ITER", "10"])
    assert cfg.MODEL.DCNV2.BACKEND == "auto"
    assert cfg.MODEL.BACKBONE.NAME == "build_dcnv2_resnet_fpn_backbone"
    assert list(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE) == [False, True, True, True]
    assert cfg.MODEL.RESNETS.DEFORM_MODULATED and cfg.MODEL.RESNETS.DEFORM_NUM_GROUPS == 1
    assert cfg.MODEL.WEIGHTS == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR) == (16, 0.02)
    assert tuple(cfg.SOLVER.STEPS) == (60000, 80000)
    assert cfg.SOLVER.MAX_ITER == 10  # the override
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (640, 672, 704, 736, 768, 800)
    assert cfg.INPUT.MIN_SIZE_TEST == 800


def test_missing_coco_is_one_clear_error(tmp_path, monkeypatch):
    name = "dcnv2_test_missing_coco"
    json_file = str(tmp_path / "coco" / "annotations" / "instances_val2017.json")
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(json_file=json_file, image_root=str(tmp_path / "coco" / "val"))
    try:
        with pytest.raises(DatasetNotFoundError) as e:
            check_datasets([name])
        assert json_file in str(e.value) and "instances_{train,val}2017.json" in str(e.value)
        with pytest.raises(DatasetNotFoundError, match="not registered"):
            check_datasets(["no_such_dataset"])
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_wheel_contains_package_and_configs(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            ROOT,
        ],
        check=True,
    )
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    assert "dcnv2/__init__.py" in names and "dcnv2/layers/deform_conv.py" in names
    assert "dcnv2/configs/faster_rcnn_R50_mdconv_FPN_1x.yaml" in names
    assert "dcnv2/configs/Base-DCNv2-RCNN-FPN.yaml" in names
    # the native backend compiles this source on first use
    assert "dcnv2/layers/csrc/deform_conv_cpu.cpp" in names
