"""Safe weight loading: tensors-only .pth, arrays-only .pkl, a clear refusal with the override,
detectron2's .pkl formats and the project's own checkpoints still loading, and the wiring
(config key, Trainer, LazyConfig loop, demo tools)."""

import collections
import os
import pickle

import numpy as np
import pytest
import torch
from detectron2.engine import defaults as d2_defaults
from detectron2.solver import LRMultiplier
from fvcore.common.param_scheduler import MultiStepParamScheduler
from torch import nn

import dcnv2
from dcnv2.checkpoint import (
    DCNv2Checkpointer,
    UnsafeCheckpointError,
    build_checkpointer,
    load_checkpoint_file,
)


class _RunsCode:
    """Unpickling this calls os.mkdir(path): a stand-in for a payload that runs code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


class _Plain:
    """An ordinary class: not dangerous, but not a tensor either."""

    def __init__(self):
        self.value = 3


def _tiny():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def _tampered(tmp_path, suffix):
    marker = tmp_path / "code_ran"
    path = str(tmp_path / f"tampered{suffix}")
    payload = {"model": _tiny().state_dict(), "extra": _RunsCode(marker)}
    if suffix == ".pkl":
        payload["model"] = {k: v.numpy() for k, v in payload["model"].items()}
        payload["__author__"] = "someone"  # detectron2's model-zoo .pkl layout
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, path)
    return path, marker


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".pkl"])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, suffix):
    path, marker = _tampered(tmp_path, suffix)
    with pytest.raises(UnsafeCheckpointError) as info:
        DCNv2Checkpointer(_tiny()).load(path)
    assert not marker.exists()
    message = str(info.value)
    assert "mkdir" in message and path in message  # what it asked for, which file
    assert "MODEL.DCNV2.ALLOW_UNSAFE_WEIGHTS" in message and "allow_unsafe=True" in message
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint_file(path)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_allow_unsafe_is_the_explicit_override(tmp_path, suffix):
    path, marker = _tampered(tmp_path, suffix)
    DCNv2Checkpointer(_tiny(), allow_unsafe=True).load(path)
    assert marker.is_dir()  # plain pickle: the payload ran, as the user asked


def test_a_harmless_custom_class_is_refused_too_and_loads_when_allowed(tmp_path):
    path = str(tmp_path / "custom.pth")
    model = _tiny()
    torch.save({"model": model.state_dict(), "note": _Plain()}, path)
    with pytest.raises(UnsafeCheckpointError, match="_Plain"):
        DCNv2Checkpointer(_tiny()).load(path)
    target = _tiny()
    extra = DCNv2Checkpointer(target, allow_unsafe=True).load(path)
    assert extra["note"].value == 3
    assert torch.equal(target[0].weight, model[0].weight)


def test_a_damaged_file_is_not_reported_as_unsafe(tmp_path):
    path = tmp_path / "damaged.pth"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(Exception) as info:
        DCNv2Checkpointer(_tiny()).load(str(path))
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_detectron2_model_zoo_pkl_with_numpy_arrays_loads(tmp_path):
    model = _tiny()
    arrays = collections.OrderedDict(
        (k, v.detach().numpy() + 1.0)
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    )
    data = {"model": arrays, "__author__": "Detectron2 Model Zoo", "step": np.int64(7)}
    path = str(tmp_path / "zoo.pkl")
    with open(path, "wb") as f:
        # protocol 2, as Python 2 era files (detectron2's ImageNet models) are written
        pickle.dump(data, f, protocol=2)
    target = _tiny()
    assert DCNv2Checkpointer(target).load(path)["step"] == 7  # numpy scalars are data too
    assert torch.allclose(target[0].weight, model[0].weight + 1.0)
    assert torch.allclose(target[1].running_var, model[1].running_var + 1.0)


def test_caffe2_style_pkl_drops_momentum_and_uses_name_matching(tmp_path):
    blobs = {"conv1_w": np.ones((4, 3, 3, 3), np.float32), "conv1_w_momentum": np.zeros(1)}
    path = str(tmp_path / "c2.pkl")
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    loaded = DCNv2Checkpointer(_tiny())._load_file(path)
    assert loaded["__author__"] == "Caffe2" and loaded["matching_heuristics"] is True
    assert set(loaded["model"]) == {"conv1_w"}


def test_a_checkpoint_saved_by_a_training_run_resumes_in_safe_mode(tmp_path):
    # What DefaultTrainer saves: model, optimizer, scheduler, iteration (and AMP's grad scaler).
    model = _tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model(torch.rand(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    scheduler = LRMultiplier(
        optimizer, MultiStepParamScheduler([1, 0.1], milestones=[5], num_updates=10), 10
    )
    scaler = torch.amp.GradScaler("cpu")
    checkpointer = DCNv2Checkpointer(
        model, str(tmp_path), optimizer=optimizer, scheduler=scheduler, grad_scaler=scaler
    )
    checkpointer.save("model_0000009", iteration=9)

    resumed = _tiny()
    optimizer2 = torch.optim.SGD(resumed.parameters(), lr=0.5, momentum=0.9)
    scheduler2 = LRMultiplier(
        optimizer2, MultiStepParamScheduler([1, 0.1], milestones=[5], num_updates=10), 10
    )
    checkpointer2 = DCNv2Checkpointer(
        resumed, str(tmp_path), optimizer=optimizer2, scheduler=scheduler2
    )
    extra = checkpointer2.resume_or_load("", resume=True)
    assert extra["iteration"] == 9
    assert torch.equal(resumed[0].weight, model[0].weight)
    assert optimizer2.state_dict()["state"][0]["momentum_buffer"].shape == (4, 3, 3, 3)


def test_config_key_defaults_to_safe_and_build_checkpointer_follows_it():
    cfg = dcnv2.get_cfg()
    assert cfg.MODEL.DCNV2.ALLOW_UNSAFE_WEIGHTS is False
    assert build_checkpointer(cfg, _tiny()).allow_unsafe is False
    cfg = dcnv2.get_cfg(opts=["MODEL.DCNV2.ALLOW_UNSAFE_WEIGHTS", "True"])
    assert build_checkpointer(cfg, _tiny()).allow_unsafe is True


def test_trainer_and_demo_predictor_load_through_the_safe_checkpointer(tmp_path):
    from detectron2.engine import DefaultTrainer

    from dcnv2.engine import Trainer
    from dcnv2.tools.cli import setup_cfg
    from dcnv2.tools.demo import DemoRunner

    class NoDataTrainer(Trainer):
        @classmethod
        def build_train_loader(cls, cfg):
            return []

    # Built explicitly: detectron2's defaults module is left as it is, and the trainer's
    # checkpointer is dcnv2's, following the config.
    original = d2_defaults.DetectionCheckpointer
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.DCNV2.ALLOW_UNSAFE_WEIGHTS", "True"]
    cfg = dcnv2.get_cfg("faster_rcnn_R50_mdconv_FPN_1x.yaml", opts + ["OUTPUT_DIR", str(tmp_path)])
    trainer = NoDataTrainer(cfg)
    assert isinstance(trainer.checkpointer, DCNv2Checkpointer) and trainer.checkpointer.allow_unsafe
    assert d2_defaults.DetectionCheckpointer is original
    assert Trainer.__init__ is not DefaultTrainer.__init__
    # The demo predictor's weights come through the same checkpointer: a refusal names the key.
    path, marker = _tampered(tmp_path, ".pth")
    demo_cfg = setup_cfg("faster_rcnn_R50_mdconv_FPN_1x.yaml", ["MODEL.WEIGHTS", path])
    from dcnv2.errors import UserInputError

    with pytest.raises(UserInputError, match="ALLOW_UNSAFE_WEIGHTS"):
        DemoRunner(demo_cfg)
    assert not marker.exists()


def test_lazy_config_loop_reads_train_allow_unsafe_weights(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"train": {"output_dir": str(tmp_path)}})
    assert build_checkpointer(cfg, _tiny()).allow_unsafe is False
    cfg.train.allow_unsafe_weights = True
    assert build_checkpointer(cfg, _tiny()).allow_unsafe is True
    # Its weight errors name the LazyConfig key.
    assert build_checkpointer(cfg, _tiny()).keys.weights == "train.init_checkpoint"


def test_demo_tools_turn_a_refusal_into_a_user_error(tmp_path):
    from dcnv2.errors import UserInputError
    from dcnv2.tools.cli import load_weights

    path, marker = _tampered(tmp_path, ".pth")
    with pytest.raises(UserInputError, match="ALLOW_UNSAFE_WEIGHTS"):
        load_weights(_tiny(), dcnv2.get_cfg(opts=["MODEL.WEIGHTS", path]))
    assert not marker.exists()


def test_pycls_pyth_checkpoint_loads_tensors_only(tmp_path):
    model = _tiny()
    path = str(tmp_path / "regnet.pyth")
    torch.save({"model_state": model.state_dict(), "epoch": 100}, path)
    loaded = DCNv2Checkpointer(_tiny())._load_file(path)
    assert loaded["__author__"] == "pycls" and loaded["matching_heuristics"] is True
    assert "1.num_batches_tracked" not in loaded["model"]
    torch.save({"model_state": model.state_dict(), "note": _Plain()}, path)
    with pytest.raises(UnsafeCheckpointError, match="_Plain"):
        DCNv2Checkpointer(_tiny())._load_file(path)
