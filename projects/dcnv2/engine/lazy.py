"""Training and evaluation from a LazyConfig (``.py``) file.

The loop of detectron2's ``tools/lazyconfig_train_net.py`` (``instantiate``, a trainer, hooks,
``DetectionCheckpointer``, ``inference_on_dataset``), with what dcnv2's YAML ``Trainer`` adds:
DDP that works on CPU (gloo), mixed precision on any device (``train.amp.enabled``), datasets
checked before anything is built (by ``train_net.py``'s preflight), safe weight loading
(``DCNv2Checkpointer``; a trusted file that needs arbitrary pickled objects takes
``train.allow_unsafe_weights=True``), atomic checkpoints, and the same reliability as the YAML
``Trainer``:

- when ``dataloader.train`` is detectron2's ``build_detection_train_loader`` with its default
  sampler (as in detectron2's ``common/data`` configs), it is built as a
  :class:`~dcnv2.data.resumable.ResumableTrainLoader` from the same dataset, mapper, batch size,
  aspect-ratio grouping and workers, and per-iteration random seeds are set
  (:class:`~dcnv2.engine.hooks.ResumableDataHook`), so ``--resume`` continues exactly where the
  run stopped; the stream's seed is ``train.seed`` (random when negative or absent) and is
  saved in the checkpoints. Any other loader is used as configured (its stream restarts on
  resume; a warning says so).
- a non-finite loss stops the run on every process, naming the iteration and the checkpoint to
  resume from, or skips up to ``train.max_nonfinite_skips`` (default 0) updates.
- SIGTERM/SIGINT stop the run after the iteration in progress, with a checkpoint
  (:class:`~dcnv2.engine.preemption.PreemptionHook`).
- detectron2's ``DatasetMapper`` is built as dcnv2's (:mod:`dcnv2.data.mapper`: images read
  without silent damage); a training set of ``get_detection_dataset_dicts`` is loaded by
  :func:`~dcnv2.data.validation.load_training_dicts` (malformed polygons named, boxes kept when
  ``mapper.use_instance_mask`` is False); a test loader of detectron2's
  ``build_detection_test_loader`` over one dataset checks its images
  (:mod:`dcnv2.data.test_loader`: an unreadable image is one error line naming it).

A config defines ``model``, ``dataloader`` (``train``, ``test``, ``evaluator``), ``optimizer``,
``lr_multiplier`` and ``train`` (detectron2's ``common/train.py`` keys, plus the optional
``seed``, ``max_nonfinite_skips`` and ``allow_unsafe_weights``).
"""

import logging
from typing import Any, List, Optional, Tuple

from detectron2.config import instantiate
from detectron2.engine import default_writers, hooks
from detectron2.evaluation import DatasetEvaluators, inference_on_dataset, print_csv_format
from detectron2.utils import comm
from omegaconf import DictConfig, OmegaConf

from ..checkpoint import build_checkpointer
from ..data.mapper import DatasetMapper
from ..data.resumable import ResumableTrainLoader
from ..data.test_loader import build_checked_test_loader, load_test_dicts
from ..data.validation import load_training_dicts
from ..dialects import LAZY_KEYS
from ..lazy_config import load_config
from .eval_output import evaluated_weights, record_eval_weights
from .evaluation import NothingDetectedWarning
from .hooks import ResumableDataHook, quiet_user_error_tracebacks
from .preemption import PreemptionHook
from .preflight import check_devices
from .setup import setup_run
from .trainer import build_training_loop, create_ddp_model, explain_nonfinite_stop

__all__ = ["build_mapper", "build_test_loader", "build_train_loader", "do_test", "do_train", "main"]

# What the dataloaders call in detectron2's common/data configs.
_D2_TRAIN_LOADER = "detectron2.data.build.build_detection_train_loader"
_D2_TEST_LOADER = "detectron2.data.build.build_detection_test_loader"
_D2_DATASET_DICTS = "detectron2.data.build.get_detection_dataset_dicts"
_D2_MAPPER = "detectron2.data.dataset_mapper.DatasetMapper"

logger = logging.getLogger(__name__)


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}"


def build_mapper(mapper_cfg) -> Any:
    """The mapper of a dataloader config: detectron2's ``DatasetMapper`` is built as dcnv2's
    :class:`~dcnv2.data.mapper.DatasetMapper` (same arguments), any other as configured."""
    if _target_name(mapper_cfg.get("_target_")) != _D2_MAPPER:
        return instantiate(mapper_cfg)
    # Resolved in place: its values may be interpolations of other dataloader keys.
    resolved = (
        OmegaConf.to_container(mapper_cfg, resolve=True)
        if isinstance(mapper_cfg, DictConfig)
        else dict(mapper_cfg)
    )
    resolved["_target_"] = DatasetMapper
    return instantiate(resolved)


def _names(dataset_cfg) -> List[str]:
    names = dataset_cfg.names
    return [names] if isinstance(names, str) else list(names)


def _train_dicts(dataset_cfg, mask_on: bool) -> Any:
    # load_training_dicts for detectron2's get_detection_dataset_dicts, else as configured.
    if _target_name(dataset_cfg.get("_target_")) != _D2_DATASET_DICTS:
        return instantiate(dataset_cfg)
    return load_training_dicts(
        _names(dataset_cfg),
        filter_empty=dataset_cfg.get("filter_empty", True),
        min_keypoints=dataset_cfg.get("min_keypoints", 0),
        proposal_files=dataset_cfg.get("proposal_files", None),
        mask_on=mask_on,
    )


def build_test_loader(cfg) -> Any:
    """``cfg.dataloader.test``: detectron2's ``build_detection_test_loader`` over one dataset of
    ``get_detection_dataset_dicts`` is built with checked images
    (:func:`~dcnv2.data.test_loader.build_checked_test_loader`); any other as configured."""
    test = cfg.dataloader.test
    dataset = test.get("dataset", None)
    simple = (
        _target_name(test.get("_target_")) == _D2_TEST_LOADER
        and dataset is not None
        and _target_name(dataset.get("_target_")) == _D2_DATASET_DICTS
        and len(_names(dataset)) == 1
        and not dataset.get("proposal_files", None)
        and all(test.get(key) is None for key in ("sampler", "collate_fn"))
        and test.get("batch_size", 1) == 1
    )
    if not simple:
        return instantiate(test)
    (name,) = _names(dataset)
    return build_checked_test_loader(
        load_test_dicts(name),
        build_mapper(test.mapper),
        dataset_name=name,
        num_workers=test.get("num_workers", 0),
    )


def build_train_loader(cfg) -> Tuple[Any, int]:
    """The training loader of a LazyConfig and the seed of its data stream.

    A :class:`~dcnv2.data.resumable.ResumableTrainLoader` when ``cfg.dataloader.train`` is
    detectron2's ``build_detection_train_loader`` over a list of dataset dicts with its default
    sampler and collation; else ``instantiate(cfg.dataloader.train)``.

    Returns:
        (loader, seed): the seed is ``cfg.train.seed``, or one drawn and shared by all
        processes when that is negative or absent.
    """
    seed = cfg.train.get("seed", -1)
    seed = int(seed) if seed is not None and seed >= 0 else comm.shared_random_seed()
    train = cfg.dataloader.train
    custom = [key for key in ("sampler", "collate_fn") if train.get(key) is not None]
    if _target_name(train.get("_target_")) == _D2_TRAIN_LOADER and not custom:
        dataset = _train_dicts(train.dataset, train.mapper.get("use_instance_mask", True))
        if isinstance(dataset, list):  # dataset dicts (get_detection_dataset_dicts)
            loader = ResumableTrainLoader(
                dataset,
                build_mapper(train.mapper),
                train.total_batch_size,
                seed=seed,
                aspect_ratio_grouping=train.get("aspect_ratio_grouping", True),
                num_workers=train.get("num_workers", 0),
            )
            return loader, seed
    what = f"its {' and '.join(custom)}" if custom else _target_name(train.get("_target_"))
    logger.warning(
        "dataloader.train is built as configured (%s): its data stream restarts when a run is "
        "resumed. detectron2's build_detection_train_loader with the default sampler resumes "
        "exactly.",
        what,
    )
    return instantiate(train), seed


def do_test(cfg, model) -> Optional[dict]:
    """Evaluate ``model`` on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator``.

    Returns:
        The evaluator's results (``{"bbox": {"AP": ...}, ...}``), or None when the config
        has no evaluator.
    """
    if "evaluator" not in cfg.dataloader:
        return None
    evaluator = DatasetEvaluators([NothingDetectedWarning(), instantiate(cfg.dataloader.evaluator)])
    results = inference_on_dataset(model, build_test_loader(cfg), evaluator)
    print_csv_format(results)
    return results


def do_train(cfg, args) -> None:
    """Train ``cfg.model`` for ``cfg.train.max_iter`` iterations.

    Args:
        cfg: a LazyConfig (see the module docstring).
        args: the command line of ``train_net.py``; only ``args.resume`` is read.
    """
    quiet_user_error_tracebacks()
    check_devices(cfg.train.device, 1, LAZY_KEYS)
    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader, seed = build_train_loader(cfg)

    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = build_training_loop(
        model,
        train_loader,
        optimizer,
        amp=cfg.train.amp.enabled,
        max_nonfinite_skips=LAZY_KEYS.value(cfg, LAZY_KEYS.max_nonfinite_skips, 0),
        keys=LAZY_KEYS,
    )
    checkpointer = build_checkpointer(cfg, model, cfg.train.output_dir, trainer=trainer)
    main_process = comm.is_main_process()
    trainer.register_hooks(
        [
            # First, so every other hook's before_step already sees this iteration's seeds.
            ResumableDataHook(seed),
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
            # Last, so a checkpoint written on SIGTERM holds the whole iteration.
            PreemptionHook(checkpointer),
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # A checkpoint stores the iteration that just finished: go on from the next one.
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    try:
        trainer.train(start_iter, cfg.train.max_iter)
    except FloatingPointError as e:
        raise explain_nonfinite_stop(e, checkpointer, LAZY_KEYS, trainer.iter) from None


def main(args):
    """``train_net.py``'s entry point for a ``.py`` config (``--eval-only``, ``--resume``), in
    each process; the launching process has checked the datasets
    (:func:`dcnv2.engine.preflight.check_before_launch`)."""
    cfg = load_config(args.config_file, args.opts)
    setup_run(cfg, args)
    if not args.eval_only:
        return do_train(cfg, args)
    check_devices(cfg.train.device, 1, LAZY_KEYS)
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    model = create_ddp_model(model)
    checkpointer = build_checkpointer(cfg, model, cfg.train.output_dir)
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    if comm.is_main_process():
        weights = evaluated_weights(checkpointer, cfg.train.init_checkpoint, args.resume)
        record_eval_weights(cfg, weights)
    return do_test(cfg, model)
