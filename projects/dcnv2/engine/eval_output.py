"""What ``train_net.py --eval-only`` writes beside a training run's files: its config as
:data:`EVAL_CONFIG` (the run's ``config.yaml``, which the tools read, stays) and the identity of
the weights it evaluated as :data:`WEIGHTS_RECORD`; :func:`check_eval_results` refuses, before
anything is written, to replace results of other weights unless ``--force``."""

import json
import os
from typing import Dict, Optional

from detectron2.utils import comm

from ..checkpoint import build_checkpointer
from ..config import YAML_KEYS, cfg_get, run_keys
from ..errors import OutputDirError

__all__ = ["EVAL_CONFIG", "WEIGHTS_RECORD", "check_eval_results", "load_eval_weights"]

EVAL_CONFIG = "config_eval.yaml"
WEIGHTS_RECORD = "evaluated_weights.json"
# What detectron2's COCOEvaluator writes in its output folder.
RESULT_FILES = ("coco_instances_results.json", "instances_predictions.pth")


def eval_results_dir(cfg) -> Optional[str]:
    """The folder an evaluation of ``cfg`` writes its results in, or None when it writes none."""
    if run_keys(cfg) is YAML_KEYS:
        return os.path.join(cfg.OUTPUT_DIR, "inference") if cfg.OUTPUT_DIR else None
    folder = cfg_get(cfg, "dataloader.evaluator.output_dir")
    return folder if isinstance(folder, str) and folder else None


def weights_identity(path: str) -> Dict:
    """Absolute path, size and modification time (a checkpoint is rewritten, never edited)."""
    if not path or "://" in path:
        return {"path": path}
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def check_eval_results(cfg, weights: str, *, force: bool) -> None:
    """Raise :class:`~dcnv2.errors.OutputDirError` unless an eval-only run of ``weights`` may
    write its results: the folder holds none, or results of these same weights (recorded, or
    the folder's run's ``model_final.pth``), or ``force`` (``--force``)."""
    folder = eval_results_dir(cfg)
    if force or folder is None:
        return
    existing = [f for f in RESULT_FILES if os.path.isfile(os.path.join(folder, f))]
    if not existing:
        return
    try:
        with open(os.path.join(folder, WEIGHTS_RECORD)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = None
    if isinstance(record, dict):
        if record == weights_identity(weights):
            return
        what = f"results of other weights ({record.get('path') or 'a random model'})"
    else:
        own = os.path.join(os.path.dirname(os.path.abspath(folder)), "model_final.pth")
        if weights and os.path.abspath(weights) == own:
            return  # the run's final evaluation is of its final weights
        what = "results of the run in that folder"
    raise OutputDirError(
        f"--eval-only would overwrite {what} in {folder} ({', '.join(existing)}); set "
        f"{run_keys(cfg).output_dir} to another folder to keep them, or pass --force to replace "
        "them"
    )


def load_eval_weights(cfg, model, resume: bool) -> None:
    """Load into ``model`` the weights an eval-only run evaluates: with ``resume`` the checkpoint
    ``last_checkpoint`` names (when there is one), else the config's weights; the main process
    records which in :data:`WEIGHTS_RECORD` beside the results."""
    keys = run_keys(cfg)
    weights = cfg_get(cfg, keys.weights, "")
    checkpointer = build_checkpointer(cfg, model, cfg_get(cfg, keys.output_dir, ""))
    checkpointer.resume_or_load(weights, resume=resume)
    folder = eval_results_dir(cfg)
    if not comm.is_main_process() or folder is None:
        return
    if resume and checkpointer.has_checkpoint():
        weights = checkpointer.get_checkpoint_file()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, WEIGHTS_RECORD), "w") as f:
        json.dump(weights_identity(weights), f)
