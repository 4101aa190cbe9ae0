"""Training and evaluation for dcnv2 configs: detectron2's DefaultTrainer with a COCO evaluator,
distributed training and mixed precision that also work on CPU (gloo, bfloat16)."""

import contextlib
import logging
import os
from typing import Optional

import detectron2.engine.defaults as d2_defaults
import detectron2.utils.comm as comm
from detectron2.data import DatasetMapper, MetadataCatalog, build_detection_test_loader
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator

from ..checkpoint import dcnv2_checkpointer_in_d2_defaults
from ..data import build_test_augmentation
from ..data.resumable import build_resumable_train_loader
from ..errors import NonFiniteLossError
from ..solver import build_optimizer
from .amp import amp_trainer
from .hooks import ResumableDataHook, guard_nonfinite_losses, quiet_user_error_tracebacks

__all__ = ["Trainer", "create_ddp_model"]

logger = logging.getLogger(__name__)


def create_ddp_model(model, **kwargs):
    """detectron2's ``create_ddp_model`` that also accepts CPU models.

    detectron2 always passes ``device_ids=[local_rank]``, which DistributedDataParallel rejects
    for a module whose parameters are on the CPU (multi-process CPU training with gloo).
    """
    if "device_ids" not in kwargs and next(model.parameters()).device.type == "cpu":
        kwargs["device_ids"] = None
    return _D2_CREATE_DDP_MODEL(model, **kwargs)


_D2_CREATE_DDP_MODEL = d2_defaults.create_ddp_model
_D2_AMP_TRAINER = d2_defaults.AMPTrainer


@contextlib.contextmanager
def _device_agnostic_parts(cfg):
    # DefaultTrainer.__init__ calls the module-level create_ddp_model and AMPTrainer (which
    # asserts CUDA) and DetectionCheckpointer (unpickles anything); swap them only while the
    # trainer is being built.
    d2_defaults.create_ddp_model = create_ddp_model
    d2_defaults.AMPTrainer = amp_trainer
    try:
        with dcnv2_checkpointer_in_d2_defaults(cfg):
            yield
    finally:
        d2_defaults.create_ddp_model = _D2_CREATE_DDP_MODEL
        d2_defaults.AMPTrainer = _D2_AMP_TRAINER


def explain_nonfinite_stop(
    error: NonFiniteLossError, checkpointer, period_option: str
) -> NonFiniteLossError:
    """``error`` with what the run left behind: the last checkpoint to ``--resume`` from (and
    whether it may hold diverged weights), or that none was written (``period_option``)."""
    if checkpointer.has_checkpoint():
        kept = (
            f" The last checkpoint, {checkpointer.get_checkpoint_file()}, was written before "
            "this iteration and is unchanged: continue from it with --resume once the cause is "
            "fixed."
        )
        if "diverged" in error.args[1:]:
            kept += " It may already hold diverged weights: if so, use an earlier one."
    else:
        kept = f" No checkpoint had been written yet ({period_option})."
    return NonFiniteLossError(str(error) + kept)


class Trainer(DefaultTrainer):
    """DefaultTrainer for dcnv2 models: COCO evaluation, CPU-capable DDP, mixed precision
    (``SOLVER.AMP.ENABLED``) on any device, ``MODEL.DCNV2.OFFSET_LR_MULTIPLIER``, safe weight
    loading (``dcnv2.checkpoint.DCNv2Checkpointer``, ``MODEL.DCNV2.ALLOW_UNSAFE_WEIGHTS``).

    Reliability: atomic checkpoints; a training loader and per-iteration seeds that make a resumed
    run continue exactly (``dcnv2.data.resumable``, ``dcnv2.engine.hooks``); non-finite losses
    stop the run, or skip up to ``SOLVER.DCNV2.MAX_NONFINITE_SKIPS`` iterations, on every process
    together; ``DATASETS.DCNV2.ON_BAD_DATA`` for bad annotations and unreadable images."""

    def __init__(self, cfg):
        quiet_user_error_tracebacks()
        with _device_agnostic_parts(cfg):
            super().__init__(cfg)
        # Whatever loop DefaultTrainer picked (plain, AMP, autocast): check the losses on every
        # process before the optimizer step (dcnv2.engine.hooks). The subclass only adds methods.
        self._trainer.__class__ = guard_nonfinite_losses(type(self._trainer))
        skips = cfg.SOLVER.get("DCNV2", {}).get("MAX_NONFINITE_SKIPS", 0)
        self._trainer.max_nonfinite_skips = skips

    @classmethod
    def build_train_loader(cls, cfg):
        return build_resumable_train_loader(cfg)

    def build_hooks(self):
        seed = getattr(self.data_loader, "seed", None)
        if seed is None:
            seed = self.cfg.SEED if self.cfg.SEED >= 0 else comm.shared_random_seed()
        # First, so every other hook's before_step already sees this iteration's seeds.
        return [ResumableDataHook(seed)] + super().build_hooks()

    def train(self):
        try:
            return super().train()
        except NonFiniteLossError as e:
            raise explain_nonfinite_stop(e, self.checkpointer, "SOLVER.CHECKPOINT_PERIOD") from None

    @classmethod
    def build_test_loader(cls, cfg, dataset_name: str):
        # The resize of INPUT.DCNV2.RESIZE_BACKEND (MMDetection's with the configs/mmdet files).
        mapper = DatasetMapper(cfg, False, augmentations=build_test_augmentation(cfg))
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_evaluator(
        cls, cfg, dataset_name: str, output_folder: Optional[str] = None
    ) -> DatasetEvaluator:
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
        if evaluator_type != "coco":
            raise ValueError(
                f"dcnv2's Trainer evaluates COCO-format datasets; {dataset_name!r} has "
                f"evaluator_type={evaluator_type!r}. Override Trainer.build_evaluator for it."
            )
        return COCOEvaluator(dataset_name, output_dir=output_folder)
