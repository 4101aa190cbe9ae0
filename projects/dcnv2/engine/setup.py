"""``setup_run``: detectron2's ``default_setup`` for YAML configs and LazyConfigs, except that an
eval-only run saves its config as ``config_eval.yaml``, a shipped config given by name is logged,
and with detectron2's CUDA ops loaded the environment report comes from a child process
(detectron2 built with CUDA 13's nvcc crashes in ``collect_env_info``)."""

import importlib.util
import os
import subprocess
import sys

import torch
from detectron2.config import CfgNode, LazyConfig
from detectron2.utils import comm
from detectron2.utils.collect_env import collect_env_info
from detectron2.utils.env import seed_all_rng
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from ..config import cfg_get, run_keys
from ..data.coco import register_config_datasets
from ..model_zoo import resolve_config_file
from .eval_output import EVAL_CONFIG

__all__ = ["environment_info", "setup_run"]

# Run by the child process; its output is the report.
ENV_SCRIPT = "from detectron2.utils.collect_env import collect_env_info; print(collect_env_info())"


def _detectron2_cuda_ops_loaded() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("detectron2._C") is not None


def environment_info(timeout: float = 300.0) -> str:
    """detectron2's ``collect_env_info``, from a child process when its compiled ops are loaded
    with CUDA; one line saying why when that fails."""
    if not _detectron2_cuda_ops_loaded():
        return collect_env_info()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", ENV_SCRIPT], capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable (collecting it failed: {e})"
    if proc.returncode == 0:
        return proc.stdout.rstrip("\n")
    if proc.returncode < 0:
        how = f"was killed by signal {-proc.returncode}"
    else:
        lines = proc.stderr.strip().splitlines()
        how = f"exited with status {proc.returncode}" + (f" ({lines[-1]})" if lines else "")
    return (
        f"unavailable: detectron2's collect_env_info {how}; detectron2 built with CUDA 13's "
        "nvcc crashes in _C.get_cuda_version(). The run is not affected."
    )


def setup_run(cfg, args) -> None:
    """Register the COCO datasets of ``cfg`` (YAML or LazyConfig) in every process, then do what
    ``default_setup`` does for ``train_net.py``'s parsed ``args``: output folder, loggers,
    environment and command line logged, config saved, seeds plus the rank, cuDNN benchmarking."""
    register_config_datasets(cfg)
    keys = run_keys(cfg)
    output_dir = cfg_get(cfg, keys.output_dir)
    eval_only = getattr(args, "eval_only", False)
    writes = comm.is_main_process() and output_dir
    if writes:
        PathManager.mkdirs(output_dir)
    rank = comm.get_rank()
    setup_logger(output_dir, distributed_rank=rank, name="fvcore")
    logger = setup_logger(output_dir, distributed_rank=rank)
    logger.info(f"Rank of current process: {rank}. World size: {comm.get_world_size()}")
    info = environment_info()
    (logger.warning if info.startswith("unavailable") else logger.info)(
        "Environment info:\n" + info
    )
    logger.info(f"Command line arguments: {args}")
    if getattr(args, "config_file", ""):
        path = resolve_config_file(args.config_file)  # a shipped config's name, as get_cfg does
        with PathManager.open(path, "r") as f:
            logger.info(f"Contents of args.config_file={args.config_file} ({path}):\n{f.read()}")
    if writes:
        # An eval-only run keeps the training run's config.yaml, which the tools read.
        path = os.path.join(output_dir, EVAL_CONFIG if eval_only else "config.yaml")
        if isinstance(cfg, CfgNode):
            logger.info(f"Running with full config:\n{cfg.dump()}")
            with PathManager.open(path, "w") as f:
                f.write(cfg.dump())
        else:
            LazyConfig.save(cfg, path)
        logger.info(f"Full config saved to {path}")
    seed = cfg_get(cfg, keys.seed, -1)
    seed_all_rng(None if seed is None or seed < 0 else seed + rank)
    if not eval_only:
        torch.backends.cudnn.benchmark = cfg_get(cfg, keys.cudnn_benchmark, False)
