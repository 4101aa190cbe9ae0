"""Training and evaluation from a LazyConfig (``.py``) file.

The loop of detectron2's ``tools/lazyconfig_train_net.py`` (``instantiate``, a trainer, hooks,
``DetectionCheckpointer``, ``inference_on_dataset``), with what dcnv2's YAML ``Trainer`` adds:
DDP that works on CPU (gloo), mixed precision on any device (``train.amp.enabled``), datasets
checked before anything is built, safe weight loading (``DCNv2Checkpointer``; a trusted file
that needs arbitrary pickled objects takes ``train.allow_unsafe_weights=True``). A config
defines ``model``, ``dataloader`` (``train``, ``test``, ``evaluator``), ``optimizer``,
``lr_multiplier`` and ``train`` (detectron2's ``common/train.py`` keys).
"""

import logging
from typing import List, Optional

import torch
from detectron2.config import instantiate
from detectron2.engine import SimpleTrainer, default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from ..checkpoint import DCNv2Checkpointer
from ..data import check_datasets
from ..lazy_config import load_config
from .amp import amp_trainer
from .trainer import create_ddp_model

__all__ = ["datasets_used", "do_test", "do_train", "main"]

logger = logging.getLogger(__name__)


def _names(dataset_cfg) -> List[str]:
    names = dataset_cfg.names
    return [names] if isinstance(names, str) else list(names)


def datasets_used(cfg, eval_only: bool) -> List[str]:
    """Names of the datasets a run of ``cfg`` reads: test set, and train set unless eval-only."""
    names = _names(cfg.dataloader.test.dataset) if "test" in cfg.dataloader else []
    if not eval_only:
        names += _names(cfg.dataloader.train.dataset)
    return names


def _check_device(cfg) -> None:
    device = torch.device(cfg.train.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"train.device is {cfg.train.device!r} but CUDA is not available; "
            "add train.device=cpu to the command line to run on the CPU"
        )


def _checkpointer(cfg, model, **checkpointables) -> DCNv2Checkpointer:
    allow_unsafe = bool(cfg.train.get("allow_unsafe_weights", False))
    checkpointer = DCNv2Checkpointer(
        model, cfg.train.output_dir, allow_unsafe=allow_unsafe, **checkpointables
    )
    checkpointer.weights_option = "train.init_checkpoint"  # named in weight errors
    return checkpointer


def do_test(cfg, model) -> Optional[dict]:
    """Evaluate ``model`` on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator``.

    Returns:
        The evaluator's results (``{"bbox": {"AP": ...}, ...}``), or None when the config
        has no evaluator.
    """
    if "evaluator" not in cfg.dataloader:
        return None
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    print_csv_format(results)
    return results


def do_train(cfg, args) -> None:
    """Train ``cfg.model`` for ``cfg.train.max_iter`` iterations.

    Args:
        cfg: a LazyConfig (see the module docstring).
        args: the command line of ``train_net.py``; only ``args.resume`` is read.
    """
    _check_device(cfg)
    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = (amp_trainer if cfg.train.amp.enabled else SimpleTrainer)(
        model, train_loader, optimizer
    )
    checkpointer = _checkpointer(cfg, model, trainer=trainer)
    main_process = comm.is_main_process()
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            (
                hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
                if main_process
                else None
            ),
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if main_process
                else None
            ),
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # A checkpoint stores the iteration that just finished: go on from the next one.
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    """``train_net.py``'s entry point for a ``.py`` config (``--eval-only``, ``--resume``)."""
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    check_datasets(datasets_used(cfg, args.eval_only))
    if not args.eval_only:
        return do_train(cfg, args)
    _check_device(cfg)
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    model = create_ddp_model(model)
    _checkpointer(cfg, model).resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    return do_test(cfg, model)
