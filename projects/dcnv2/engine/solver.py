"""detectron2's SGD with its own learning rate for the offset convs (``conv2_offset`` in every
deformable block): ``MODEL.DCNV2.OFFSET_LR_MULTIPLIER`` (the DCNv2 paper 0.1, MMDetection's
``dcn_offset_lr_mult`` and detectron2 1.0, as the shipped configs), applied through
``get_default_optimizer_params(lr_factor_func=...)``, so every other rule stays detectron2's."""

import functools
from typing import Callable

import torch
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

__all__ = ["OFFSET_PARAM_KEY", "offset_lr_factor_func", "build_optimizer"]

# Name of the offset/mask-predicting conv in DCNv2BottleneckBlock (and detectron2's
# DeformBottleneckBlock); a parameter is an offset parameter when this is one of its name parts.
OFFSET_PARAM_KEY = "conv2_offset"


def _offset_lr_factor(name: str, multiplier: float) -> float:
    return multiplier if OFFSET_PARAM_KEY in name.split(".") else 1.0


def offset_lr_factor_func(multiplier: float) -> Callable[[str], float]:
    """An ``lr_factor_func`` for detectron2's ``get_default_optimizer_params``.

    Usable in a LazyConfig: ``optimizer.params.lr_factor_func =
    L(offset_lr_factor_func)(multiplier=0.1)`` (``optimizer.params.base_lr`` must be set).

    Args:
        multiplier: learning-rate factor of ``*conv2_offset*`` parameters (>= 0).

    Returns:
        A function of a full parameter name (``"backbone.bottom_up.res3.0.conv2_offset.weight"``)
        returning ``multiplier`` for offset parameters and 1.0 for every other one.
    """
    multiplier = float(multiplier)
    if not multiplier >= 0:  # also rejects NaN
        raise ValueError(
            f"the offset learning-rate multiplier must be a number >= 0, got {multiplier}"
        )
    # A partial of a module-level function, unlike a closure, can be pickled with the config.
    return functools.partial(_offset_lr_factor, multiplier=multiplier)


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """detectron2's SGD from ``cfg.SOLVER``, with ``MODEL.DCNV2.OFFSET_LR_MULTIPLIER`` applied.

    Same optimizer as ``detectron2.solver.build_optimizer`` (momentum, nesterov, weight decay,
    ``WEIGHT_DECAY_NORM``, ``BIAS_LR_FACTOR``, ``WEIGHT_DECAY_BIAS``, gradient clipping); with
    the default multiplier 1.0 the parameter groups are exactly detectron2's. If
    ``BIAS_LR_FACTOR`` is not 1, it sets the lr of every bias, offset-conv biases included.
    """
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
