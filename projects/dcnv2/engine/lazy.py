"""Training and evaluation from a LazyConfig (``.py``): detectron2's ``lazyconfig_train_net.py``
with the YAML ``Trainer``'s checkpointer, training loop, non-finite guard and preemption hook."""

import logging
from typing import Optional

from detectron2.config import instantiate
from detectron2.engine import default_writers, hooks
from detectron2.evaluation import DatasetEvaluators, inference_on_dataset, print_csv_format
from detectron2.utils import comm

from ..checkpoint import build_checkpointer
from ..config import LAZY_KEYS, cfg_get, load_config
from ..data.resumable import ResumableTrainLoader
from .eval_output import load_eval_weights
from .evaluation import NothingDetectedWarning
from .hooks import ResumableDataHook, quiet_user_error_tracebacks
from .preemption import PreemptionHook
from .setup import setup_run
from .trainer import build_training_loop, create_ddp_model, explain_nonfinite_stop

__all__ = ["do_test", "do_train", "main"]

logger = logging.getLogger(__name__)


def do_test(cfg, model) -> Optional[dict]:
    """Evaluate ``model`` on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator`` (the
    results; None when the config has no evaluator)."""
    if "evaluator" not in cfg.dataloader:
        return None
    evaluator = DatasetEvaluators([NothingDetectedWarning(), instantiate(cfg.dataloader.evaluator)])
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), evaluator)
    print_csv_format(results)
    return results


def do_train(cfg, args) -> None:
    """Train ``cfg.model`` for ``cfg.train.max_iter`` iterations (detectron2's
    ``common/train.py`` keys, plus the optional ``train.max_nonfinite_skips`` and
    ``train.allow_unsafe_weights``), resuming with ``args.resume``."""
    quiet_user_error_tracebacks()
    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    if isinstance(train_loader, ResumableTrainLoader):
        # First, so every other hook's before_step already sees this iteration's seeds.
        data_hook = ResumableDataHook(train_loader.seed)
    else:
        data_hook = None
        logger.info(
            f"The training loader ({type(train_loader).__name__}) restarts its data stream when "
            "the run is resumed; dcnv2.data.resumable.build_resumable_train_loader resumes it "
            "exactly."
        )

    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = build_training_loop(
        model,
        train_loader,
        optimizer,
        amp=cfg.train.amp.enabled,
        max_nonfinite_skips=cfg_get(cfg, LAZY_KEYS.max_nonfinite_skips, 0),
        keys=LAZY_KEYS,
    )
    checkpointer = build_checkpointer(cfg, model, cfg.train.output_dir, trainer=trainer)
    periodic = writer = None
    if comm.is_main_process():
        periodic = hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
        writers = default_writers(cfg.train.output_dir, cfg.train.max_iter)
        writer = hooks.PeriodicWriter(writers, period=cfg.train.log_period)
    lr_hook = hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier))
    eval_hook = hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model))
    hook_list = [data_hook, hooks.IterationTimer(), lr_hook, periodic, eval_hook, writer]
    # The preemption hook last, so a checkpoint written on SIGTERM holds the whole iteration.
    trainer.register_hooks(hook_list + [PreemptionHook(checkpointer)])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # A checkpoint stores the iteration that just finished: go on from the next one.
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    try:
        trainer.train(start_iter, cfg.train.max_iter)
    except FloatingPointError as e:
        raise explain_nonfinite_stop(e, checkpointer, LAZY_KEYS, trainer.iter) from None


def main(args):
    """``train_net.py``'s entry point for a ``.py`` config, in each process (checked before by
    :func:`dcnv2.engine.preflight.check_before_launch`)."""
    cfg = load_config(args.config_file, args.opts)
    setup_run(cfg, args)
    if not args.eval_only:
        return do_train(cfg, args)
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    model = create_ddp_model(model)
    load_eval_weights(cfg, model, args.resume)
    return do_test(cfg, model)
