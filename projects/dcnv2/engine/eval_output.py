"""What ``train_net.py --eval-only`` writes beside a training run's files, and what it must not
overwrite: its config goes to :data:`EVAL_CONFIG` (the run's ``config.yaml``, which the tools read,
stays), the weights it evaluated to :data:`WEIGHTS_RECORD` beside the results, and it refuses
(:func:`check_eval_results`, before anything is written) to replace results of other weights
unless ``--force``.
"""

import json
import os
from typing import Dict, List, Optional

from ..config import YAML_KEYS, cfg_get, run_keys
from ..errors import OutputDirError

__all__ = [
    "EVAL_CONFIG",
    "RESULT_FILES",
    "WEIGHTS_RECORD",
    "check_eval_results",
    "eval_results_dir",
    "evaluated_weights",
    "record_eval_weights",
    "weights_identity",
]

# The config an eval-only run saves in OUTPUT_DIR (a training run saves config.yaml).
EVAL_CONFIG = "config_eval.yaml"
# What detectron2's COCOEvaluator writes in its output folder.
RESULT_FILES = ("coco_instances_results.json", "instances_predictions.pth")
# The weights whose results the folder holds, written by an eval-only run.
WEIGHTS_RECORD = "evaluated_weights.json"


def eval_results_dir(cfg) -> Optional[str]:
    """The folder an evaluation of ``cfg`` writes its results in, or None when it writes none
    (a LazyConfig whose evaluator has no ``output_dir``)."""
    keys = run_keys(cfg)
    if keys is YAML_KEYS:
        output_dir = cfg.OUTPUT_DIR
        return os.path.join(output_dir, "inference") if output_dir else None
    folder = cfg_get(cfg, "dataloader.evaluator.output_dir")
    return folder if isinstance(folder, str) and folder else None


def weights_identity(path: str) -> Dict:
    """What tells two weights files apart cheaply: absolute path, size and modification time
    (a checkpoint is rewritten, never edited in place)."""
    if not path or "://" in path:
        return {"path": path}
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _existing_results(folder: str) -> List[str]:
    return [
        os.path.join(folder, f) for f in RESULT_FILES if os.path.isfile(os.path.join(folder, f))
    ]


def _recorded(folder: str) -> Optional[Dict]:
    try:
        with open(os.path.join(folder, WEIGHTS_RECORD)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def check_eval_results(cfg, weights: str, *, force: bool) -> None:
    """An eval-only run of ``weights`` may write its results: the results folder holds none, or
    results of these same weights (recorded, or the folder's run's ``model_final.pth``), or
    ``force``.

    Args:
        cfg: the run's config (YAML or LazyConfig).
        weights: the weights evaluated (``MODEL.WEIGHTS``, or the checkpoint ``--resume`` loads).
        force: ``--force``: replace them anyway.

    Raises:
        OutputDirError: results of other weights would be overwritten.
    """
    folder = eval_results_dir(cfg)
    if force or folder is None:
        return
    existing = _existing_results(folder)
    if not existing:
        return
    current = weights_identity(weights) if weights else {"path": ""}
    record = _recorded(folder)
    if record is not None:
        if record == current:
            return
        what = f"results of other weights ({record.get('path') or 'a random model'})"
    else:
        output_dir = os.path.dirname(os.path.abspath(folder))
        own = os.path.join(output_dir, "model_final.pth")
        if weights and os.path.abspath(weights) == own:
            return  # the run's final evaluation is of its final weights
        what = "results of the run in that folder"
    keys = run_keys(cfg)
    files = ", ".join(os.path.basename(f) for f in existing)
    raise OutputDirError(
        f"--eval-only would overwrite {what} in {folder} ({files}); set {keys.output_dir} to "
        "another folder to keep them, or pass --force to replace them"
    )


def evaluated_weights(checkpointer, weights: str, resume: bool) -> str:
    """The file an eval-only run loads: the checkpoint ``last_checkpoint`` names with
    ``--resume`` (when there is one), else ``weights``."""
    if resume and checkpointer.has_checkpoint():
        return checkpointer.get_checkpoint_file()
    return weights


def record_eval_weights(cfg, weights: str) -> None:
    """Write :data:`WEIGHTS_RECORD` (the identity of ``weights``) in the results folder."""
    folder = eval_results_dir(cfg)
    if folder is None:
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, WEIGHTS_RECORD), "w") as f:
        json.dump(weights_identity(weights) if weights else {"path": ""}, f)
