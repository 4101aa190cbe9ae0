"""detectron2's SGD with ``MODEL.DCNV2.OFFSET_LR_MULTIPLIER`` as the learning-rate factor of the
offset convs (the DCNv2 paper 0.1; MMDetection and detectron2 1.0, as the shipped configs), through
``get_default_optimizer_params(lr_factor_func=...)``."""

import functools
from typing import Callable

import torch
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

__all__ = ["OFFSET_PARAM_KEY", "offset_lr_factor_func", "build_optimizer"]

# The offset/mask conv of DCNv2BottleneckBlock (and detectron2's DeformBottleneckBlock).
OFFSET_PARAM_KEY = "conv2_offset"


def _offset_lr_factor(name: str, multiplier: float) -> float:
    return multiplier if OFFSET_PARAM_KEY in name.split(".") else 1.0


def offset_lr_factor_func(multiplier: float) -> Callable[[str], float]:
    """An ``lr_factor_func`` for ``get_default_optimizer_params``: ``multiplier`` (>= 0) for the
    parameters of ``conv2_offset`` modules, 1.0 for every other one. In a LazyConfig:
    ``optimizer.params.lr_factor_func = L(offset_lr_factor_func)(multiplier=0.1)``."""
    multiplier = float(multiplier)
    if not multiplier >= 0:  # also rejects NaN
        raise ValueError(
            f"the offset learning-rate multiplier must be a number >= 0, got {multiplier}"
        )
    # A partial of a module-level function, unlike a closure, can be pickled with the config.
    return functools.partial(_offset_lr_factor, multiplier=multiplier)


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``detectron2.solver.build_optimizer``'s SGD with ``MODEL.DCNV2.OFFSET_LR_MULTIPLIER``
    applied (a ``BIAS_LR_FACTOR`` other than 1 sets the lr of every bias, offsets' included)."""
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        lr_factor_func=offset_lr_factor_func(cfg.MODEL.DCNV2.OFFSET_LR_MULTIPLIER),
    )
    optimizer = torch.optim.SGD(
        params,
        lr=cfg.SOLVER.BASE_LR,
        momentum=cfg.SOLVER.MOMENTUM,
        nesterov=cfg.SOLVER.NESTEROV,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        foreach=True,
    )
    return maybe_add_gradient_clipping(cfg, optimizer)
