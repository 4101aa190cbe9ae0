"""Checks ``train_net.py`` runs in the launching process, before any worker, model or output file;
each problem is one :class:`~dcnv2.errors.DCNv2Error` saying what is wrong and what was expected."""

import logging
import os
import tempfile
from typing import Dict, Optional

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model

from ..checkpoint import build_checkpointer
from ..checkpoint.atomic import last_checkpoint_pointer
from ..checkpoint.integrity import check_weights_file
from ..config import (
    YAML_KEYS,
    RunKeys,
    cfg_get,
    check_solver,
    datasets_used,
    get_cfg,
    is_lazy_config,
    load_config,
    run_keys,
)
from ..data import build_test_augmentation, check_datasets
from ..data.coco import register_config_datasets
from ..data.test_loader import check_test_images
from ..data.validation import validate_datasets
from ..errors import ConfigError, ConfigFileNotFoundError, LaunchError, OutputDirError, WeightsError
from .eval_output import check_eval_results

__all__ = ["check_before_launch", "check_devices", "check_eval_weights", "check_weights"]
__all__ += ["load_run_config", "preflight"]

logger = logging.getLogger(__name__)


def check_devices(device: str, num_gpus: int, keys: RunKeys = YAML_KEYS) -> None:
    """``--num-gpus`` processes on ``device`` (the value of ``keys.device``) fit this machine.

    Raises:
        LaunchError: fewer than 1 process, a bad device, or more CUDA processes than GPUs.
    """
    if num_gpus < 1:
        raise LaunchError(f"--num-gpus is {num_gpus}; expected at least 1 (processes per machine)")
    key = keys.device
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise LaunchError(f"{key} is {device!r}; expected a torch device such as 'cuda'") from None
    if kind != "cuda":
        return
    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    note = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
    if count == 0:
        raise LaunchError(
            f"{key} is {device!r} but no CUDA GPU is visible{note}. To train on the "
            f"CPU add {key} cpu (--num-gpus then counts CPU processes)."
        )
    if num_gpus > count:
        raise LaunchError(
            f"--num-gpus {num_gpus} but this machine has {count} CUDA GPU(s){note}; expected "
            f"--num-gpus <= {count}. Scale SOLVER.IMS_PER_BATCH and SOLVER.BASE_LR with the "
            "number of GPUs (see the README)."
        )


def check_output_dir(output_dir: str, keys: RunKeys = YAML_KEYS) -> None:
    """``output_dir`` exists, or can be created, and a file can be created in it (by trying:
    permission bits do not tell for root, read-only mounts or quotas)."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir, prefix=".dcnv2_write_test_"):
            pass
    except OSError as e:
        raise OutputDirError(
            f"{keys.output_dir} {os.path.abspath(output_dir)} is not writable "
            f"({e.strerror or e}); expected a folder this user can create files in"
        ) from None


def check_weights(weights: str, keys: RunKeys = YAML_KEYS) -> None:
    """A local weights path names a file that can be a checkpoint (URLs are fetched later)."""
    check_weights_file(weights, f"given by {keys.weights}", resuming=False)


def check_weights_fit(cfg) -> None:
    """Load ``MODEL.WEIGHTS`` into the config's model built on the CPU, as training will:
    tensors that do not fit raise :class:`~dcnv2.errors.WeightsError` before anything is written.
    """
    cpu_cfg = cfg.clone()
    cpu_cfg.defrost()
    cpu_cfg.MODEL.DEVICE = "cpu"
    build_checkpointer(cpu_cfg, build_model(cpu_cfg)).load(cfg.MODEL.WEIGHTS)


def check_backend(cfg) -> None:
    """``MODEL.DCNV2.BACKEND`` is a deformable-conv backend usable on ``MODEL.DEVICE``."""
    from ..layers.backends import resolve_backend

    if cfg.MODEL.DCNV2.BACKEND == "auto":
        return  # a backend for every device, chosen (and loaded) by the workers
    try:
        resolve_backend(cfg.MODEL.DCNV2.BACKEND, torch.device(cfg.MODEL.DEVICE))
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"MODEL.DCNV2.BACKEND: {e}") from None


def check_batch_size(cfg, keys: RunKeys, processes: int) -> None:
    """The training batch splits evenly over ``processes`` (``--num-gpus`` x ``--num-machines``).

    Raises:
        LaunchError: it does not.
    """
    key = "SOLVER.IMS_PER_BATCH" if keys is YAML_KEYS else "dataloader.train.total_batch_size"
    batch = cfg_get(cfg, key)
    if not isinstance(batch, int) or isinstance(batch, bool):
        return  # a LazyConfig whose loader has no total batch size
    if batch < 1 or batch % processes:
        raise LaunchError(
            f"{key} is {batch}, which does not split over {processes} process(es) "
            f"(--num-gpus x --num-machines); expected a positive multiple of {processes}"
        )


def model_num_classes(cfg, keys: RunKeys) -> Dict[str, int]:
    """The model's class count(s) a dataset's categories must equal, by config key."""
    if keys is YAML_KEYS:
        retina = cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
        names = ["MODEL.RETINANET.NUM_CLASSES" if retina else "MODEL.ROI_HEADS.NUM_CLASSES"]
    else:
        names = ["model.roi_heads.num_classes", "model.num_classes"]
    found = {name: cfg_get(cfg, name) for name in names}
    return {k: v for k, v in found.items() if isinstance(v, int) and not isinstance(v, bool)}


def _resume_file(output_dir: str) -> Optional[str]:
    """The checkpoint ``--resume`` loads (``last_checkpoint`` names it), or None."""
    pointer = last_checkpoint_pointer(output_dir)
    if not output_dir or not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(output_dir, f.read().strip())


def preflight(
    cfg,
    *,
    num_gpus: int,
    resume: bool,
    eval_only: bool,
    num_machines: int = 1,
    opts=(),
    force: bool = False,
) -> None:
    """Every check above, cheapest first, for a YAML config or a LazyConfig
    (:func:`load_run_config`) and ``train_net.py``'s options (``opts``: its overrides). The
    datasets are checked (and the synthetic ones generated) here only."""
    keys = run_keys(cfg)
    yaml = isinstance(cfg, CfgNode)
    if not eval_only:
        check_solver(cfg)
    if yaml:
        build_test_augmentation(cfg)  # INPUT.DCNV2.RESIZE_BACKEND known, OpenCV there if named
    train, test = datasets_used(cfg)
    output_dir = cfg_get(cfg, keys.output_dir, "")
    check_devices(cfg_get(cfg, keys.device), num_gpus, keys)
    if yaml:
        check_backend(cfg)
    if not eval_only:
        check_batch_size(cfg, keys, num_gpus * num_machines)
    resume_file = _resume_file(output_dir) if resume else None
    if resume_file is not None:
        pointer = last_checkpoint_pointer(output_dir)
        check_weights_file(resume_file, f"named by {pointer} (--resume)", resuming=True)
    else:
        if eval_only:
            check_eval_weights(cfg, opts)
        check_weights(cfg_get(cfg, keys.weights, ""), keys)
    if eval_only:
        train = ()
        check_eval_results(cfg, resume_file or cfg_get(cfg, keys.weights, "") or "", force=force)
    check_datasets(test + train)
    on_bad_data = cfg_get(cfg, keys.on_bad_data, "fail")
    validate_datasets(train, test, on_bad_data, num_classes=model_num_classes(cfg, keys))
    check_test_images(test, on_bad_data)  # read by evaluation, after training or instead of it
    if output_dir:
        check_output_dir(output_dir, keys)
    if resume_file is None and yaml and cfg.MODEL.WEIGHTS:
        check_weights_fit(cfg)


def load_run_config(config_file: str, opts):
    """The YAML config (``CfgNode``) or LazyConfig ``train_net.py``'s command line names, with
    its overrides; the COCO datasets it names (:mod:`dcnv2.data.coco`) are registered."""
    if not is_lazy_config(config_file):
        cfg = get_cfg(config_file, opts)
    else:
        try:
            cfg = load_config(config_file, opts)
        except FileNotFoundError as e:
            raise ConfigFileNotFoundError(str(e)) from None
    register_config_datasets(cfg)
    return cfg


def check_eval_weights(cfg, opts) -> None:
    """``--eval-only`` evaluates trained weights: with none (``MODEL.WEIGHTS`` empty, or an
    ImageNet backbone as the configs' default) it refuses, unless the command line (``opts``)
    sets the weights itself (:class:`~dcnv2.errors.WeightsError`); set empty there, a random
    model is evaluated, with a warning."""
    keys = run_keys(cfg)
    weights = cfg_get(cfg, keys.weights, "") or ""
    if keys is YAML_KEYS:
        given = list(opts)[::2]
    else:
        given = [opt.partition("=")[0].strip().lstrip("+") for opt in opts]
    if keys.weights in given:
        if not weights:
            logger.warning(
                f"--eval-only with {keys.weights} empty: evaluating a randomly initialised model"
            )
        return
    if not weights or "imagenetpretrained" in weights.lower():
        what = f"is {weights}, ImageNet backbone weights" if weights else "is empty"
        raise WeightsError(
            f"--eval-only but {keys.weights} {what}: there is no trained detector to evaluate. "
            f"Give the run's weights (e.g. {keys.weights}{' ' if keys is YAML_KEYS else '='}"
            f'output/.../model_final.pth), or set {keys.weights} "" explicitly on the command '
            "line to evaluate a random model"
        )


def check_before_launch(args) -> None:
    """:func:`preflight` for ``train_net.py``'s command line."""
    preflight(
        load_run_config(args.config_file, args.opts),
        num_gpus=args.num_gpus,
        resume=args.resume,
        eval_only=args.eval_only,
        num_machines=args.num_machines,
        opts=args.opts,
        force=getattr(args, "force", False),
    )
