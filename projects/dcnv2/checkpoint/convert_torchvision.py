"""torchvision ImageNet ResNet / ResNeXt weights as a detectron2 initialisation (``.pkl``).

:attr:`ResNetSpec.overrides` gives the config keys the weights need (stride, input format).
"""

from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch

from .weights_io import (
    RESNET_RULES,
    ResNetSpec,
    check_shapes,
    expected_resnet_shapes,
    format_overrides,
    infer_resnet_spec,
    read_input,
    rename_key,
    save_weights,
)

__all__ = ["conversion_report", "convert_torchvision_checkpoint", "convert_torchvision_state_dict"]


def convert_torchvision_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> Tuple[Dict[str, np.ndarray], ResNetSpec, List[str]]:
    """Rename a torchvision ResNet/ResNeXt state dict to detectron2's ResNet names.

    Returns:
        (weights, spec, dropped): detectron2-named float32 numpy arrays; the architecture; the names
        left out on purpose (``fc``, ``num_batches_tracked``).
    """
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    spec = infer_resnet_spec(shapes)
    dropped = sorted(k for k in shapes if k.endswith("num_batches_tracked") or k.startswith("fc."))
    kept = {k: v for k, v in shapes.items() if k not in dropped}
    check_shapes(kept, expected_resnet_shapes(spec), "not a torchvision ResNet")
    weights = {
        rename_key(k, RESNET_RULES): state_dict[k].detach().to(torch.float32).cpu().numpy()
        for k in kept
    }
    return weights, spec, dropped


def convert_torchvision_checkpoint(
    input_path: str, output_path: str, *, allow_unsafe: bool = False, overwrite: bool = False
) -> Tuple[ResNetSpec, List[str]]:
    """Convert a torchvision ResNet ``.pth`` into a detectron2 ``.pkl``; return (spec, dropped)."""
    state_dict, _ = read_input(input_path, output_path, (".pkl",), overwrite, allow_unsafe)
    weights, spec, dropped = convert_torchvision_state_dict(state_dict)
    data = {"model": weights, "__author__": "torchvision", "matching_heuristics": True}
    save_weights(data, output_path)
    return spec, dropped


def conversion_report(spec: ResNetSpec, dropped: Sequence[str], output_path: str) -> str:
    """What :func:`convert_torchvision_checkpoint` wrote and how to train from it."""
    counters = [k for k in dropped if k.endswith("num_batches_tracked")]
    others = [k for k in dropped if k not in counters]
    pairs = [("MODEL.WEIGHTS", output_path), *spec.overrides()]
    return "\n".join(
        [
            f"wrote {output_path}: {spec.name} ImageNet weights in detectron2 names",
            f"left out: {', '.join(others) or 'nothing'} and {len(counters)} BN counter(s)",
            "config overrides (pytorch-style ResNet, RGB input normalised like torchvision):",
            "  " + format_overrides(pairs),
        ]
    )
