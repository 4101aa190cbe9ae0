"""Checks ``train_net.py`` runs in the launching process, before any worker, model or output file:
each problem is one :class:`~dcnv2.errors.DCNv2Error` saying what is wrong and what was expected;
and the reporting of such errors from worker processes.
"""

import logging
import os
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

import torch
from detectron2.utils import comm

from ..checkpoint import UnsafeCheckpointError
from ..config import get_cfg
from ..data import build_test_augmentation, check_datasets
from ..data.validation import validate_datasets
from ..errors import ConfigFileNotFoundError, DCNv2Error, LaunchError, OutputDirError, WeightsError
from ..lazy_config import is_lazy_config, load_config

__all__ = [
    "USER_ERRORS",
    "USER_ERROR_EXIT",
    "check_before_launch",
    "check_devices",
    "check_output_dir",
    "check_weights",
    "check_weights_fit",
    "preflight",
    "report_user_errors",
]

# Problems with the user's input: reported as one "error: ..." line, without a traceback.
USER_ERRORS = (DCNv2Error, UnsafeCheckpointError)
# Exit status of a worker process that reported a user error (argparse uses 2 for its own).
USER_ERROR_EXIT = 3

logger = logging.getLogger(__name__)


def check_devices(device: str, num_gpus: int, device_option: str = "MODEL.DEVICE") -> None:
    """``--num-gpus`` processes on ``device`` fit this machine.

    Raises:
        LaunchError: fewer than 1 process, a CUDA device without CUDA, or more processes than
            visible GPUs.
    """
    if num_gpus < 1:
        raise LaunchError(f"--num-gpus is {num_gpus}; expected at least 1 (processes per machine)")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise LaunchError(
            f"{device_option} is {device!r}; expected a torch device such as 'cuda' or 'cpu'"
        ) from None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    note = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
    if kind == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise LaunchError(
                f"{device_option} is {device!r} but no CUDA GPU is visible{note}. To train on the "
                f"CPU add {device_option} cpu (--num-gpus then counts CPU processes)."
            )
        if num_gpus > count:
            raise LaunchError(
                f"--num-gpus {num_gpus} but this machine has {count} CUDA GPU(s){note}; expected "
                f"--num-gpus <= {count}. Scale SOLVER.IMS_PER_BATCH and SOLVER.BASE_LR with the "
                "number of GPUs (see the README)."
            )
    elif kind == "cpu" and num_gpus > (os.cpu_count() or 1):
        logger.warning(
            f"--num-gpus {num_gpus} CPU processes on {os.cpu_count()} cores: they will share them"
        )


def check_output_dir(output_dir: str, option: str = "OUTPUT_DIR") -> None:
    """``output_dir`` exists, or can be created, and a file can be created in it (by trying:
    permission bits do not tell for root, read-only mounts or quotas)."""
    if not output_dir:
        return
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir, prefix=".dcnv2_write_test_"):
            pass
    except OSError as e:
        reason = e.strerror or str(e)
        raise OutputDirError(
            f"{option} {os.path.abspath(output_dir)} is not writable ({reason}); expected a "
            f"folder this user can create files in. Point {option} elsewhere."
        ) from None


def check_weights(weights: str, option: str = "MODEL.WEIGHTS") -> None:
    """A local weights path names an existing file (URLs are fetched later)."""
    if not weights or "://" in weights:
        return
    if not os.path.isfile(weights):
        if os.path.isdir(weights):
            what = "is a folder"
        else:  # a device file (/dev/null), a FIFO or a socket exists but is not a file
            what = "is not a regular file" if os.path.exists(weights) else "does not exist"
        raise WeightsError(
            f"Weights file {weights} (given by {option}) {what}; expected a .pth/.pkl checkpoint "
            "file (or a URL such as detectron2://...)"
        )


def check_weights_fit(cfg) -> None:
    """Load ``MODEL.WEIGHTS`` into the config's model built on the CPU, as training will: a
    truncated file, tensors of the wrong shape or a file that fits nothing raise
    :class:`~dcnv2.errors.WeightsError` here, before the run writes anything."""
    if not cfg.MODEL.WEIGHTS:
        return
    from detectron2.modeling import build_model

    from ..checkpoint import build_checkpointer

    cpu_cfg = cfg.clone()
    cpu_cfg.defrost()
    cpu_cfg.MODEL.DEVICE = "cpu"
    model = build_model(cpu_cfg)
    build_checkpointer(cpu_cfg, model).load(cfg.MODEL.WEIGHTS)


def _resume_file(output_dir: str) -> Optional[str]:
    pointer = os.path.join(output_dir, "last_checkpoint")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(output_dir, f.read().strip())


def preflight(
    *,
    train_datasets: Sequence[str],
    test_datasets: Sequence[str],
    device: str,
    num_gpus: int,
    output_dir: str,
    weights: str,
    resume: bool,
    on_bad_data: str = "fail",
    keys: Optional[dict] = None,
) -> None:
    """Every check above, cheapest first, in the launching process.

    Args:
        train_datasets, test_datasets: dataset names the run reads (train empty for eval-only).
        device, num_gpus: the model's device and ``--num-gpus``.
        output_dir, weights: the run's output folder and initial weights.
        resume: ``--resume``: the checkpoint ``last_checkpoint`` names, if any, replaces
            ``weights``.
        on_bad_data: ``DATASETS.DCNV2.ON_BAD_DATA``.
        keys: the config keys to name in messages, if not the YAML ones: ``device``,
            ``output_dir``, ``weights``.
    """
    keys = dict(
        {"device": "MODEL.DEVICE", "output_dir": "OUTPUT_DIR", "weights": "MODEL.WEIGHTS"},
        **(keys or {}),
    )
    check_devices(device, num_gpus, keys["device"])
    resume_file = _resume_file(output_dir) if resume and output_dir else None
    if resume_file is not None:
        if not os.path.isfile(resume_file):
            raise WeightsError(
                f"--resume: {os.path.join(output_dir, 'last_checkpoint')} names {resume_file}, "
                "which does not exist; restore it, or start without --resume"
            )
    else:
        check_weights(weights, keys["weights"])
    check_datasets(list(test_datasets) + list(train_datasets))
    validate_datasets(train_datasets, test_datasets, on_bad_data)
    check_output_dir(output_dir, keys["output_dir"])


def check_before_launch(args) -> None:
    """:func:`preflight` for ``train_net.py``'s command line (a YAML or a LazyConfig file)."""
    if is_lazy_config(args.config_file):
        from . import lazy

        try:
            cfg = load_config(args.config_file, args.opts)
        except FileNotFoundError as e:
            raise ConfigFileNotFoundError(str(e)) from None
        test = lazy.datasets_used(cfg, eval_only=True)
        train = lazy.datasets_used(cfg, eval_only=False)[len(test) :]
        keys = {"device": "train.device", "output_dir": "train.output_dir"}
        keys["weights"] = "train.init_checkpoint"
        run = dict(device=cfg.train.device, output_dir=cfg.train.output_dir, keys=keys)
        run.update(weights=cfg.train.init_checkpoint)
    else:
        cfg = get_cfg(args.config_file, args.opts)
        build_test_augmentation(cfg)  # INPUT.DCNV2.RESIZE_BACKEND known, OpenCV there if named
        test, train = list(cfg.DATASETS.TEST), list(cfg.DATASETS.TRAIN)
        run = dict(device=cfg.MODEL.DEVICE, output_dir=cfg.OUTPUT_DIR, weights=cfg.MODEL.WEIGHTS)
        run.update(on_bad_data=cfg.DATASETS.DCNV2.ON_BAD_DATA)
    preflight(
        train_datasets=[] if args.eval_only else train,
        test_datasets=test,
        num_gpus=args.num_gpus,
        resume=args.resume,
        **run,
    )
    if not is_lazy_config(args.config_file) and _resume_file_or_none(args, cfg) is None:
        check_weights_fit(cfg)


def _resume_file_or_none(args, cfg) -> Optional[str]:
    return _resume_file(cfg.OUTPUT_DIR) if args.resume and cfg.OUTPUT_DIR else None


def report_user_errors(main_func: Callable, *args):
    """``main_func(*args)`` in a worker process of ``launch``: a user error is printed once, as
    one ``error: ...`` line, and the process exits with status ``USER_ERROR_EXIT`` (the launcher
    then stops the others). With one process it propagates to the caller, the launching process."""
    try:
        return main_func(*args)
    except USER_ERRORS as e:
        if comm.get_world_size() == 1:
            raise
        if not comm.is_main_process():
            # Most such errors happen on every process: leave the report to the main one,
            # whose exit makes the launcher stop this one during the wait.
            time.sleep(5)
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)
