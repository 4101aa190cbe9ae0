"""Training and evaluation of dcnv2 YAML configs (:class:`Trainer`), and the one training loop
(:func:`build_training_loop`) it shares with the LazyConfig loop and the benchmarks."""

import logging
import os
import weakref
from typing import Optional

import detectron2.utils.comm as comm
import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.engine import create_ddp_model as d2_create_ddp_model
from detectron2.evaluation import DatasetEvaluators
from detectron2.utils.logger import setup_logger

from ..checkpoint import build_checkpointer
from ..config import YAML_KEYS, RunKeys
from ..data import build_test_augmentation
from ..data.mapper import DatasetMapper
from ..data.resumable import build_resumable_train_loader
from ..data.test_loader import build_checked_test_loader, load_test_dicts
from ..errors import NonFiniteLossError
from .amp import amp_trainer
from .evaluation import EvaluatedImagesCOCOEvaluator, NothingDetectedWarning
from .hooks import NonFiniteGuard, ResumableDataHook, quiet_user_error_tracebacks, usual_causes
from .preemption import PreemptionHook
from .solver import build_optimizer

__all__ = ["Trainer", "build_training_loop", "create_ddp_model", "explain_nonfinite_stop"]


def create_ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """detectron2's ``create_ddp_model`` that also accepts CPU models (DDP rejects the
    ``device_ids=[local_rank]`` detectron2 passes for them)."""
    if "device_ids" not in kwargs and next(model.parameters()).device.type == "cpu":
        kwargs["device_ids"] = None
    return d2_create_ddp_model(model, **kwargs)


def build_training_loop(
    model: torch.nn.Module,
    data_loader,
    optimizer: torch.optim.Optimizer,
    *,
    amp: bool = False,
    max_nonfinite_skips: Optional[int] = 0,
    keys: RunKeys = YAML_KEYS,
) -> SimpleTrainer:
    """The training loop of the YAML :class:`Trainer`, the LazyConfig loop and the benchmarks:
    detectron2's ``SimpleTrainer`` (with ``amp``: :func:`~dcnv2.engine.amp.amp_trainer`) with a
    :class:`~dcnv2.engine.hooks.NonFiniteGuard`, none when ``max_nonfinite_skips`` is None."""
    loop = (amp_trainer if amp else SimpleTrainer)(model, data_loader, optimizer)
    if max_nonfinite_skips is not None:
        loop.register_hooks([NonFiniteGuard(model, max_nonfinite_skips, keys)])
    return loop


def explain_nonfinite_stop(
    error: FloatingPointError, checkpointer, keys: RunKeys = YAML_KEYS, iteration: int = -1
) -> NonFiniteLossError:
    """A :class:`~dcnv2.errors.NonFiniteLossError` for a run stopped by ``error`` that names the
    last checkpoint to ``--resume`` from. detectron2's own ``FloatingPointError`` (non-finite RPN
    predictions in the forward pass of ``iteration``) means the weights diverged earlier."""
    if not isinstance(error, NonFiniteLossError):
        error = NonFiniteLossError(
            f"The model's outputs became non-finite at iteration {iteration} ({error}): the "
            "weights diverged in an earlier update, whose loss was still finite. "
            f"{usual_causes(keys)}.",
            diverged=True,
        )
    if checkpointer.has_checkpoint():
        kept = (
            f" The last checkpoint, {checkpointer.get_checkpoint_file()}, was written before "
            "this iteration and is unchanged: continue from it with --resume once the cause is "
            "fixed."
        )
        if error.diverged:
            kept += " It may already hold diverged weights: if so, use an earlier one."
    else:
        kept = f" No checkpoint had been written yet ({keys.checkpoint_period})."
    return NonFiniteLossError(str(error) + kept, diverged=error.diverged)


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with dcnv2's training loop, checkpointer, data loaders, optimizer and
    evaluator, exact resume, and a clean stop with a checkpoint on SIGTERM/SIGINT."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__, written out with dcnv2's DDP wrapper, training loop and
        # checkpointer in place of the ones it builds.
        TrainerBase.__init__(self)
        quiet_user_error_tracebacks()
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        # Built in this order, as DefaultTrainer does.
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)

        model = create_ddp_model(model, broadcast_buffers=False)
        skips = cfg.SOLVER.DCNV2.MAX_NONFINITE_SKIPS
        self._trainer = build_training_loop(
            model, data_loader, optimizer, amp=cfg.SOLVER.AMP.ENABLED, max_nonfinite_skips=skips
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = build_checkpointer(
            cfg, model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg

        self.register_hooks(self.build_hooks())

    @classmethod
    def build_train_loader(cls, cfg):
        return build_resumable_train_loader(cfg)

    def build_hooks(self):
        seed = getattr(self.data_loader, "seed", None)
        if seed is None:
            seed = self.cfg.SEED if self.cfg.SEED >= 0 else comm.shared_random_seed()
        # First, so every other hook's before_step already sees this iteration's seeds; last,
        # so a checkpoint written on SIGTERM holds the whole iteration (LR step, metrics).
        return (
            [ResumableDataHook(seed)] + super().build_hooks() + [PreemptionHook(self.checkpointer)]
        )

    def train(self):
        try:
            return super().train()
        except FloatingPointError as e:
            raise explain_nonfinite_stop(e, self.checkpointer, YAML_KEYS, self.iter) from None

    @classmethod
    def build_test_loader(cls, cfg, dataset_name: str):
        """detectron2's test loader with ``DATASETS.DCNV2.ON_BAD_DATA``'s handling of bad images."""
        mode = cfg.DATASETS.DCNV2.ON_BAD_DATA
        proposal_file = None
        if cfg.MODEL.LOAD_PROPOSALS:
            index = list(cfg.DATASETS.TEST).index(dataset_name)
            proposal_file = cfg.DATASETS.PROPOSAL_FILES_TEST[index]
        dicts = load_test_dicts(dataset_name, mode, proposal_file=proposal_file)
        mapper = DatasetMapper(cfg, False, augmentations=build_test_augmentation(cfg))
        workers = cfg.DATALOADER.NUM_WORKERS
        return build_checked_test_loader(
            dicts, mapper, dataset_name=dataset_name, mode=mode, num_workers=workers
        )

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_folder: Optional[str] = None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
        if evaluator_type != "coco":
            raise ValueError(
                f"dcnv2's Trainer evaluates COCO-format datasets; {dataset_name!r} has "
                f"evaluator_type={evaluator_type!r}. Override Trainer.build_evaluator for it."
            )
        coco = EvaluatedImagesCOCOEvaluator(dataset_name, output_dir=output_folder)
        return DatasetEvaluators([NothingDetectedWarning(), coco])
