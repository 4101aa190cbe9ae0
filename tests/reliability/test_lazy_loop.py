"""The LazyConfig training loop builds what its config names and has the YAML Trainer's
reliability: with dcnv2's resumable loader a resumed run continues the data stream,
augmentations, random sampling and LR schedule exactly, and non-finite losses stop the run with a
clear message or are skipped up to ``train.max_nonfinite_skips``."""

import logging
import shutil

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import instantiate
from detectron2.data import DatasetMapper as D2DatasetMapper
from detectron2.modeling import GeneralizedRCNN

from dcnv2.config import load_config
from dcnv2.data.mapper import DatasetMapper
from dcnv2.data.resumable import ResumableTrainLoader
from dcnv2.engine import lazy
from dcnv2.errors import NonFiniteLossError


class _Args:
    def __init__(self, resume):
        self.resume = resume


def _tiny_lazy_cfg(dataset, output_dir, max_iter=4):
    """The seed recipe's LazyConfig on the tiny 64x64 dataset: 4 iterations of batch 2, constant
    LR, checkpoints after iterations 1 and 3, random flips and random anchor/proposal
    sampling (both must continue exactly on resume)."""
    cfg = load_config("lazy/faster_rcnn_R50_mdconv_FPN_1x.py")
    train = cfg.dataloader.train
    train.dataset.names = dataset
    train.update(total_batch_size=2, num_workers=0)
    train.mapper.augmentations = [
        {"_target_": "detectron2.data.transforms.RandomFlip", "horizontal": True}
    ]
    cfg.model.proposal_generator.update(
        pre_nms_topk=(200, 200), post_nms_topk=(20, 20), batch_size_per_image=64
    )
    cfg.model.roi_heads.batch_size_per_image = 8
    cfg.optimizer.lr = 0.001
    cfg.lr_multiplier.warmup_length = 0.0
    del cfg.dataloader.evaluator  # no evaluation: training only
    cfg.train.update(
        device="cpu",
        max_iter=max_iter,
        eval_period=0,
        init_checkpoint="",
        output_dir=str(output_dir),
        seed=7,
    )
    cfg.train.checkpointer.period = 2
    return cfg


def test_lazy_loop_builds_the_loader_the_config_names(rel, tiny_dataset, tmp_path, caplog):
    cfg = _tiny_lazy_cfg(rel.DATASET, tmp_path)
    loader = instantiate(cfg.dataloader.train)  # build_resumable_train_loader, seed ${train.seed}
    assert isinstance(loader, ResumableTrainLoader) and loader.seed == 7
    assert isinstance(loader.dataset.mapper, DatasetMapper)
    assert len(next(iter(loader))) == 2
    # A config naming detectron2's loader, mapper and dataset (its common/data/coco.py) gets
    # detectron2's pieces, and the run says once that its stream restarts on resume.
    train = model_zoo.get_config("common/data/coco.py").dataloader.train
    train.dataset.names = rel.DATASET
    train.update(total_batch_size=2, num_workers=0)
    train.mapper.augmentations = cfg.dataloader.train.mapper.augmentations
    cfg.dataloader.train = train
    cfg.train.max_iter = 1
    with caplog.at_level(logging.INFO, logger="dcnv2.engine.lazy"):
        lazy.do_train(cfg, _Args(resume=False))
    assert "training loader (AspectRatioGroupedDataset) restarts its data stream" in caplog.text
    assert type(instantiate(cfg.dataloader.train.mapper)) is D2DatasetMapper


def test_lazy_resume_equals_uninterrupted_run(rel, tiny_dataset, tmp_path):
    reference = tmp_path / "uninterrupted"
    lazy.do_train(_tiny_lazy_cfg(rel.DATASET, reference), _Args(resume=False))
    # The run "stopped" after its first checkpoint: resume from it in a fresh output folder.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(reference / "model_0000001.pth", resumed / "model_0000001.pth")
    (resumed / "last_checkpoint").write_text("model_0000001.pth")
    cfg = _tiny_lazy_cfg(rel.DATASET, resumed)
    cfg.train.seed = -1  # the checkpoint's seed wins over a new random one
    lazy.do_train(cfg, _Args(resume=True))

    start = rel.final_weights(str(reference), "model_0000001.pth")
    expected = rel.final_weights(str(reference))
    assert rel.weights_moved(expected, start) > 1e-3  # iterations 2-3 changed the weights
    # float32: BLAS may round differently at other addresses; another data stream, flip or
    # anchor sample changes the weights by about the size of the update.
    rel.assert_same_weights(rel.final_weights(str(resumed)), expected, rtol=1e-4, atol=1e-6)


def _nan_at(rel, monkeypatch, iterations):
    """Make the model that do_train instantiates give a NaN loss at ``iterations``."""
    real = lazy.instantiate

    def instantiate(cfg):
        obj = real(cfg)
        if isinstance(obj, GeneralizedRCNN):
            obj = rel.faulty.with_nan_loss(obj, set(iterations))
        return obj

    monkeypatch.setattr(lazy, "instantiate", instantiate)


def test_lazy_nonfinite_loss_stops_with_the_checkpoint_to_resume_from(
    rel, tiny_dataset, tmp_path, monkeypatch
):
    _nan_at(rel, monkeypatch, [2])
    cfg = _tiny_lazy_cfg(rel.DATASET, tmp_path)
    with pytest.raises(NonFiniteLossError) as info:
        lazy.do_train(cfg, _Args(resume=False))
    message = str(info.value)
    assert "iteration 2" in message and "loss_box_reg" in message
    assert "model_0000001.pth" in message and "--resume" in message
    assert "train.max_nonfinite_skips" in message and "optimizer.lr" in message
    assert "SOLVER." not in message  # a LazyConfig has no such keys
    assert not (tmp_path / "model_final.pth").exists()


def test_lazy_nonfinite_losses_are_skipped_up_to_the_limit(
    rel, tiny_dataset, tmp_path, monkeypatch
):
    _nan_at(rel, monkeypatch, [0])
    cfg = _tiny_lazy_cfg(rel.DATASET, tmp_path, max_iter=2)
    cfg.train.checkpointer.period = 100
    with pytest.raises(NonFiniteLossError, match="No checkpoint had been written yet"):
        lazy.do_train(cfg, _Args(resume=False))
    cfg.train.max_nonfinite_skips = 1
    cfg.train.output_dir = str(tmp_path / "skipping")
    lazy.do_train(cfg, _Args(resume=False))
    saved = torch.load(tmp_path / "skipping" / "model_final.pth", weights_only=True)
    assert saved["trainer"]["hooks"]["NonFiniteGuard"] == {"skipped": [0]}
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
