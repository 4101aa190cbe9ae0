"""torchvision ImageNet ResNet / ResNeXt weights as a detectron2 initialisation (``.pkl``).

:attr:`ResNetSpec.overrides` gives the config keys the weights need (stride, input format).
"""

from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch

from .loading import load_torch_file
from .weights_io import (
    CONVERTER_INPUT,
    ConversionError,
    ResNetSpec,
    check_output_path,
    check_shapes,
    expected_resnet_shapes,
    format_overrides,
    infer_resnet_spec,
    resnet_key_to_d2,
    save_weights,
)

__all__ = [
    "conversion_report",
    "convert_torchvision_checkpoint",
    "convert_torchvision_state_dict",
]


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
    unknown = sorted(k for k in shapes if k not in dropped and resnet_key_to_d2(k) is None)
    if unknown:
        raise ConversionError(
            f"{len(unknown)} tensor(s) are not part of a torchvision ResNet:\n"
            + "\n".join(f"  {k} {shapes[k]}" for k in unknown)
        )
    check_shapes(shapes, expected_resnet_shapes(spec), "torchvision ResNet")
    weights = {
        resnet_key_to_d2(k): v.detach().to(torch.float32).cpu().numpy()
        for k, v in state_dict.items()
        if k not in dropped
    }
    return weights, spec, dropped


def _state_dict_of(checkpoint, path: str) -> Mapping[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in checkpoint.values()
    ):
        raise ConversionError(
            f"{path!r} is not a state dict (name -> tensor), nor a dict holding one under "
            "'state_dict' or 'model'"
        )
    return checkpoint


def convert_torchvision_checkpoint(
    input_path: str, output_path: str, *, allow_unsafe: bool = False, overwrite: bool = False
) -> Tuple[ResNetSpec, List[str]]:
    """Convert a torchvision ResNet ``.pth`` into a detectron2 ``.pkl``; return (spec, dropped)."""
    check_output_path(input_path, output_path, overwrite, (".pkl",))
    state_dict = _state_dict_of(
        load_torch_file(input_path, allow_unsafe=allow_unsafe, source=CONVERTER_INPUT), input_path
    )
    weights, spec, dropped = convert_torchvision_state_dict(state_dict)
    data = {"model": weights, "__author__": "torchvision", "matching_heuristics": True}
    save_weights(data, output_path)
    return spec, dropped


def conversion_report(spec: ResNetSpec, dropped: Sequence[str], output_path: str) -> str:
    """What :func:`convert_torchvision_checkpoint` wrote and how to train from it."""
    counters = [k for k in dropped if k.endswith("num_batches_tracked")]
    others = [k for k in dropped if k not in counters]
    arch = (
        f"R{spec.depth}"
        if spec.num_groups == 1
        else f"X{spec.depth}-{spec.num_groups}x{spec.width_per_group}d"
    )
    pairs = [("MODEL.WEIGHTS", output_path), *spec.overrides()]
    return "\n".join(
        [
            f"wrote {output_path}: {arch} ImageNet weights in detectron2 names",
            f"left out: {', '.join(others) or 'nothing'} and {len(counters)} BN counter(s)",
            "config overrides (pytorch-style ResNet, RGB input normalised like torchvision):",
            "  " + format_overrides(pairs),
        ]
    )
