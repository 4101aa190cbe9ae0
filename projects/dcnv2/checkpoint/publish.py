"""Publishing trained weights: ``{"model": state_dict}``, optionally half, named by sha256."""

import hashlib
import io
import os
from typing import Any, Dict, Mapping, Tuple

import numpy as np
import torch

from ..errors import WeightsError
from .atomic import atomic_write
from .loading import load_checkpoint_file

__all__ = ["publish_model", "weights_only"]


def weights_only(checkpoint: Any, *, half: bool = False) -> Dict[str, torch.Tensor]:
    """The model tensors of a checkpoint (arrays as tensors, floats float16 if ``half``)."""
    model = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(model, Mapping):
        raise WeightsError(
            f"expected a checkpoint dict with a 'model' state dict, got {type(checkpoint).__name__}"
        )
    out = {}
    for key, value in model.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor):
            raise WeightsError(
                f"'{key}' of the model state is a {type(value).__name__}, not a tensor; expected "
                "a checkpoint written by train_net.py (or a state dict)"
            )
        value = value.detach().cpu()
        out[key] = value.half() if half and value.is_floating_point() else value.contiguous()
    if not out:
        raise WeightsError("the checkpoint's model state is empty: nothing to publish")
    return out


def publish_model(
    input_path: str,
    output_path: str,
    *,
    half: bool = False,
    force: bool = False,
    allow_unsafe: bool = False,
) -> Tuple[str, Dict[str, Any]]:
    """Write the weights of ``input_path`` to ``output_path`` with the sha256 prefix in the name.

    Returns:
        (path written, {"tensors", "parameters", "bytes", "input_bytes", "sha256", "dropped"}).
    """
    if not output_path.endswith(".pth"):
        raise WeightsError(f"output {output_path!r} must end with .pth")
    if not os.path.exists(input_path):
        raise WeightsError(f"input checkpoint {input_path!r} does not exist or is not a file")
    source = "publish_model's input"
    checkpoint = load_checkpoint_file(input_path, allow_unsafe=allow_unsafe, source=source)
    weights = weights_only(checkpoint, half=half)
    buffer = io.BytesIO()
    torch.save({"model": weights}, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    path = f"{output_path[:-4]}-{digest[:8]}.pth"  # MMDetection's publish_model convention
    if os.path.abspath(path) == os.path.abspath(input_path):
        raise WeightsError(f"{path!r} is the input file; give another output name")
    if os.path.exists(path) and not force:
        raise WeightsError(f"{path!r} exists; pass --force to replace it")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "wb", size_hint=len(data)) as f:
        f.write(data)
    dropped = sorted(k for k in checkpoint if k != "model") if "model" in checkpoint else []
    return path, {
        "tensors": len(weights),
        "parameters": sum(t.numel() for t in weights.values()),
        "bytes": len(data),
        "input_bytes": os.path.getsize(input_path),
        "sha256": digest,
        "dropped": dropped,
    }
