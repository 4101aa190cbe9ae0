"""setup_run: detectron2's default_setup steps, and an environment report whose collection
cannot end the run (detectron2 built with CUDA 13's nvcc crashes in _C.get_cuda_version())."""

import argparse
import os
import signal

import pytest
import torch
import yaml

import dcnv2
from dcnv2 import get_cfg
from dcnv2.engine import setup as setup_mod
from dcnv2.engine.setup import environment_info, setup_run


@pytest.fixture
def cuda_ops_loaded(monkeypatch):
    monkeypatch.setattr(setup_mod, "_detectron2_cuda_ops_loaded", lambda: True)


def test_cpu_report_is_detectron2s_in_process(monkeypatch):
    monkeypatch.setattr(setup_mod, "collect_env_info", lambda: "the in-process table")
    assert environment_info() == "the in-process table"


def test_report_from_a_child_process(cuda_ops_loaded, monkeypatch):
    monkeypatch.setattr(setup_mod, "ENV_SCRIPT", "print('child table')")
    assert environment_info() == "child table"


def test_child_killed_by_a_signal_is_one_line(cuda_ops_loaded, monkeypatch):
    script = f"import os; os.kill(os.getpid(), {int(signal.SIGSEGV)})"
    monkeypatch.setattr(setup_mod, "ENV_SCRIPT", script)
    info = environment_info()
    assert info.startswith("unavailable: detectron2's collect_env_info was killed by signal 11")
    assert "\n" not in info


def test_child_error_names_its_last_line(cuda_ops_loaded, monkeypatch):
    monkeypatch.setattr(setup_mod, "ENV_SCRIPT", "raise SystemExit('no nvcc here')")
    info = environment_info()
    assert "exited with status 1 (no nvcc here)" in info


def test_setup_run_saves_the_config_seeds_and_logs(tmp_path, cuda_ops_loaded, monkeypatch):
    script = f"import os; os.kill(os.getpid(), {int(signal.SIGSEGV)})"
    monkeypatch.setattr(setup_mod, "ENV_SCRIPT", script)
    cfg = get_cfg("quick/faster_rcnn_R50_mdconv_FPN_instant.yaml", ["SEED", "7"])
    cfg.OUTPUT_DIR = str(tmp_path / "run")
    cfg.freeze()
    args = argparse.Namespace(config_file="", eval_only=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    setup_run(cfg, args)
    saved = yaml.safe_load(open(os.path.join(cfg.OUTPUT_DIR, "config.yaml")))
    assert saved["SEED"] == 7 and saved["OUTPUT_DIR"] == cfg.OUTPUT_DIR
    assert torch.backends.cudnn.benchmark is False  # CUDNN_BENCHMARK, set for training runs
    first = torch.rand(3)
    setup_run(cfg, args)
    assert torch.equal(torch.rand(3), first)  # SEED + rank 0
    log = open(os.path.join(cfg.OUTPUT_DIR, "log.txt")).read()  # detectron2's logger's file
    assert "WARNING" in log and "collect_env_info was killed by signal 11" in log


@pytest.mark.parametrize(
    "name",
    ["quick/faster_rcnn_R50_mdconv_FPN_instant.yaml", "lazy/faster_rcnn_R50_mdconv_FPN_1x.py"],
)
def test_setup_run_logs_a_shipped_config_given_by_name(tmp_path, monkeypatch, name):
    # train_net.py --config-file <name>: the name resolves as dcnv2.get_cfg resolves it.
    monkeypatch.chdir(tmp_path)  # no such relative path here
    monkeypatch.setattr(setup_mod, "collect_env_info", lambda: "table")
    cfg = get_cfg("quick/faster_rcnn_R50_mdconv_FPN_instant.yaml")
    cfg.OUTPUT_DIR = str(tmp_path / "run")
    cfg.freeze()
    setup_run(cfg, argparse.Namespace(config_file=name, eval_only=True))
    log = open(os.path.join(cfg.OUTPUT_DIR, "log.txt")).read()
    path = os.path.join(os.path.dirname(dcnv2.__file__), "configs", name)
    assert f"Contents of args.config_file={name} ({path}):" in log
    assert open(path).read() in log
