"""torchvision ImageNet ResNet / ResNeXt weights as a detectron2 initialisation (``.pkl``).

MMDetection initialises its detectors from torchvision's ImageNet models
(``torchvision://resnet50``); detectron2's recipes from the MSRA caffe2 ones
(``detectron2://ImageNetPretrained/MSRA/R-50.pkl``). The two differ in more than names:

* torchvision's bottleneck strides in its 3x3 conv ("pytorch" style), MSRA's in the first 1x1
  (``MODEL.RESNETS.STRIDE_IN_1X1``);
* torchvision's models take RGB in [0, 255] normalised by the ImageNet mean and std, MSRA's take
  BGR minus the mean, not scaled.

:func:`convert_torchvision_state_dict` renames the tensors (``layer1.0.bn1`` ->
``res2.0.conv1.norm``, ``downsample`` -> ``shortcut``), drops the classifier, checks every shape,
and :attr:`ResNetSpec.overrides` gives the config keys the weights need. The ``.pkl`` written by
:func:`convert_torchvision_checkpoint` is in detectron2's model-zoo format (numpy arrays,
``matching_heuristics``), so it loads into any backbone prefix as detectron2's own ImageNet files
do.

The ResNet naming is the same in MMDetection's backbones; :mod:`.convert_mmdet` builds on it.
"""

import os
import pickle
import re
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .loading import load_torch_file

__all__ = [
    "IMAGENET_RGB_MEAN",
    "IMAGENET_RGB_STD",
    "ConversionError",
    "ResNetSpec",
    "convert_torchvision_checkpoint",
    "convert_torchvision_state_dict",
    "expected_resnet_shapes",
    "format_overrides",
    "infer_resnet_spec",
    "resnet_key_to_d2",
]

# torchvision's (and MMDetection's) input normalisation: RGB, 0-255 scale.
IMAGENET_RGB_MEAN = (123.675, 116.28, 103.53)
IMAGENET_RGB_STD = (58.395, 57.12, 57.375)

_BLOCKS_TO_DEPTH = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


class ConversionError(ValueError):
    """The weights are not the architecture the converter maps (the message lists why)."""


def _bn_d2(prefix: str, field: str) -> str:
    return f"{prefix}.norm.{field}"


def resnet_key_to_d2(key: str) -> Optional[str]:
    """detectron2 name of a torchvision-named ResNet tensor, or None if it is not one.

    ``conv1``/``bn1`` -> ``stem.conv1``(``.norm``); ``layer{i}.{j}.conv{k}``/``bn{k}`` ->
    ``res{i+1}.{j}.conv{k}``(``.norm``); ``downsample.0``/``.1`` -> ``shortcut``(``.norm``).
    ``num_batches_tracked`` and the classifier have no counterpart (None).
    """
    m = re.fullmatch(r"conv1\.weight", key)
    if m:
        return "stem.conv1.weight"
    m = re.fullmatch(r"bn1\.(\w+)", key)
    if m and m[1] in _BN_FIELDS:
        return _bn_d2("stem.conv1", m[1])
    m = re.fullmatch(r"layer([1-4])\.(\d+)\.(.+)", key)
    if not m:
        return None
    block, rest = f"res{int(m[1]) + 1}.{m[2]}", m[3]
    m = re.fullmatch(r"conv([1-3])\.weight", rest)
    if m:
        return f"{block}.conv{m[1]}.weight"
    m = re.fullmatch(r"bn([1-3])\.(\w+)", rest)
    if m and m[2] in _BN_FIELDS:
        return _bn_d2(f"{block}.conv{m[1]}", m[2])
    if rest == "downsample.0.weight":
        return f"{block}.shortcut.weight"
    m = re.fullmatch(r"downsample\.1\.(\w+)", rest)
    if m and m[1] in _BN_FIELDS:
        return _bn_d2(f"{block}.shortcut", m[1])
    return None


@dataclass(frozen=True)
class ResNetSpec:
    """A bottleneck ResNet / ResNeXt as detectron2's ``MODEL.RESNETS`` keys describe it."""

    depth: int = 50
    num_groups: int = 1
    width_per_group: int = 64
    stem_out_channels: int = 64
    res2_out_channels: int = 256

    @property
    def blocks_per_stage(self) -> Tuple[int, ...]:
        return next(b for b, d in _BLOCKS_TO_DEPTH.items() if d == self.depth)

    def overrides(self) -> List[Tuple[str, str]]:
        """``(KEY, VALUE)`` config overrides for these weights (pytorch-style, RGB input)."""
        pairs = [
            ("MODEL.RESNETS.DEPTH", str(self.depth)),
            ("MODEL.RESNETS.NUM_GROUPS", str(self.num_groups)),
            ("MODEL.RESNETS.WIDTH_PER_GROUP", str(self.width_per_group)),
            ("MODEL.RESNETS.STRIDE_IN_1X1", "False"),
            ("INPUT.FORMAT", "RGB"),
            ("MODEL.PIXEL_MEAN", _float_list(IMAGENET_RGB_MEAN)),
            ("MODEL.PIXEL_STD", _float_list(IMAGENET_RGB_STD)),
        ]
        if self.stem_out_channels != 64:
            pairs.append(("MODEL.RESNETS.STEM_OUT_CHANNELS", str(self.stem_out_channels)))
        if self.res2_out_channels != 256:
            pairs.append(("MODEL.RESNETS.RES2_OUT_CHANNELS", str(self.res2_out_channels)))
        return pairs


def _float_list(values: Sequence[float]) -> str:
    return "[" + ", ".join(repr(float(v)) for v in values) + "]"


def format_overrides(pairs: Sequence[Tuple[str, str]]) -> str:
    """The overrides as ``KEY VALUE`` arguments for ``train_net.py`` (shell-quoted)."""
    import shlex

    return " ".join(f"{k} {shlex.quote(v)}" for k, v in pairs)


def expected_resnet_shapes(spec: ResNetSpec, in_channels: int = 3) -> Dict[str, Tuple[int, ...]]:
    """Shape of every tensor of a torchvision-named bottleneck ResNet (no classifier, no
    ``num_batches_tracked``), from its spec: stem conv 7x7, then per stage a first block with a
    1x1 projection shortcut and blocks ``conv1`` 1x1, ``conv2`` 3x3 grouped, ``conv3`` 1x1."""
    shapes: Dict[str, Tuple[int, ...]] = {}

    def conv_bn(conv: str, bn: str, out_c: int, in_c: int, k: int) -> None:
        shapes[f"{conv}.weight"] = (out_c, in_c, k, k)
        for field in _BN_FIELDS:
            shapes[f"{bn}.{field}"] = (out_c,)

    conv_bn("conv1", "bn1", spec.stem_out_channels, in_channels, 7)
    in_c = spec.stem_out_channels
    width = spec.num_groups * spec.width_per_group
    out_c = spec.res2_out_channels
    for stage, num_blocks in enumerate(spec.blocks_per_stage, start=1):
        for b in range(num_blocks):
            p = f"layer{stage}.{b}"
            block_in = in_c if b == 0 else out_c
            conv_bn(f"{p}.conv1", f"{p}.bn1", width, block_in, 1)
            conv_bn(f"{p}.conv2", f"{p}.bn2", width, width // spec.num_groups, 3)
            conv_bn(f"{p}.conv3", f"{p}.bn3", out_c, width, 1)
            if b == 0:
                conv_bn(f"{p}.downsample.0", f"{p}.downsample.1", out_c, in_c, 1)
        in_c, width, out_c = out_c, width * 2, out_c * 2
    return shapes


def infer_resnet_spec(shapes: Mapping[str, Sequence[int]]) -> ResNetSpec:
    """The :class:`ResNetSpec` of torchvision-named ResNet tensors (name -> shape).

    Raises:
        ConversionError: not a bottleneck ResNet of depth 50, 101 or 152, or a ResNet-D.
    """
    if "conv1.weight" not in shapes:
        if any(k.startswith("stem.") for k in shapes):
            raise ConversionError(
                "this is a ResNet-D (deep 3x3 stem 'stem.*', average-pooling shortcuts): the "
                "plugin's backbone has detectron2's 7x7 stem and strided 1x1 shortcuts, so these "
                "weights have nowhere to go"
            )
        raise ConversionError(
            "no ResNet stem ('conv1.weight') found; expected torchvision/MMDetection ResNet names "
            "(conv1, bn1, layer1.0.conv1, ...)"
        )
    if any(re.fullmatch(r"layer\d\.\d+\.downsample\.2\.\w+", k) for k in shapes):
        raise ConversionError(
            "the shortcuts are average pooling + 1x1 conv ('downsample.2', ResNet-D avg_down): "
            "the plugin's backbone has detectron2's strided 1x1 shortcuts"
        )
    blocks = []
    for stage in range(1, 5):
        ids = {int(m[1]) for k in shapes if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(max(ids) + 1 if ids else 0)
    if "layer1.0.conv3.weight" not in shapes:
        raise ConversionError(
            "the blocks have no conv3: a basic-block ResNet (R18/R34); the plugin's deformable "
            "ResNet is built from bottleneck blocks (depth 50, 101, 152)"
        )
    depth = _BLOCKS_TO_DEPTH.get(tuple(blocks))
    if depth is None:
        raise ConversionError(
            f"blocks per stage {tuple(blocks)} match no bottleneck ResNet; expected one of "
            + ", ".join(f"{b} (R{d})" for b, d in _BLOCKS_TO_DEPTH.items())
        )
    conv2 = shapes["layer1.0.conv2.weight"]
    width, per_group = int(conv2[0]), int(conv2[1])
    if per_group <= 0 or width % per_group:
        raise ConversionError(f"layer1.0.conv2.weight has shape {tuple(conv2)}: not a grouped 3x3")
    groups = width // per_group
    return ResNetSpec(
        depth=depth,
        num_groups=groups,
        width_per_group=width // groups,
        stem_out_channels=int(shapes["conv1.weight"][0]),
        res2_out_channels=int(shapes["layer1.0.conv3.weight"][0]),
    )


def check_shapes(
    shapes: Mapping[str, Sequence[int]], expected: Mapping[str, Tuple[int, ...]], what: str
) -> None:
    """Raise a :class:`ConversionError` listing every tensor of ``expected`` that is missing
    from ``shapes`` or has another shape."""
    missing = sorted(k for k in expected if k not in shapes)
    wrong = sorted(
        f"{k}: {tuple(shapes[k])}, expected {expected[k]}"
        for k in expected
        if k in shapes and tuple(shapes[k]) != expected[k]
    )
    if missing or wrong:
        lines = [f"{what}: {len(missing)} tensor(s) missing, {len(wrong)} with an unexpected shape"]
        lines += [f"  missing: {k}" for k in missing] + [f"  shape: {w}" for w in wrong]
        raise ConversionError("\n".join(lines))


def convert_torchvision_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> Tuple[Dict[str, np.ndarray], ResNetSpec, List[str]]:
    """Rename a torchvision ResNet/ResNeXt state dict to detectron2's ResNet names.

    Args:
        state_dict: ``torchvision.models.resnet50().state_dict()`` and the like.

    Returns:
        (weights, spec, dropped): detectron2-named float32 numpy arrays (``stem.conv1.weight``,
        ``res2.0.conv1.norm.weight``, ...); the architecture; the names left out on purpose (the
        ImageNet classifier ``fc``, ``num_batches_tracked``).

    Raises:
        ConversionError: an unknown tensor, a missing one or an unexpected shape (all listed).
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


def write_atomically(path: str, write) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it to ``path``, so
    an interrupted or failed conversion leaves no partial file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_output_path(input_path: str, output_path: str, overwrite: bool, suffixes: tuple) -> None:
    """Refuse a missing input, and an output that is the input, has the wrong extension, or
    exists (unless ``overwrite``), before anything is read or written."""
    if "://" not in input_path and not os.path.isfile(input_path):
        raise ConversionError(f"input {input_path!r} does not exist or is not a file")
    if not output_path.endswith(suffixes):
        raise ConversionError(
            f"output {output_path!r} must end with {' or '.join(suffixes)}, the format "
            "detectron2's checkpointer reads it as"
        )
    if os.path.abspath(input_path) == os.path.abspath(output_path):
        raise ConversionError("the output path is the input path; give another output file")
    if os.path.exists(output_path) and not overwrite:
        raise ConversionError(f"{output_path!r} exists; pass --overwrite to replace it")


def convert_torchvision_checkpoint(
    input_path: str, output_path: str, *, allow_unsafe: bool = False, overwrite: bool = False
) -> Tuple[ResNetSpec, List[str]]:
    """Convert a torchvision ResNet ``.pth`` into a detectron2 ``.pkl`` for ``MODEL.WEIGHTS``.

    Args:
        input_path: a torchvision state dict, e.g. ``resnet50-0676ba61.pth``.
        output_path: the ``.pkl`` to write (atomically).
        allow_unsafe: load an input that needs arbitrary pickled objects (trusted files only).
        overwrite: replace ``output_path`` if it exists.

    Returns:
        (spec, dropped): see :func:`convert_torchvision_state_dict`;
        ``spec.overrides()`` are the config keys to use with these weights.
    """
    check_output_path(input_path, output_path, overwrite, (".pkl",))
    state_dict = _state_dict_of(load_torch_file(input_path, allow_unsafe=allow_unsafe), input_path)
    weights, spec, dropped = convert_torchvision_state_dict(state_dict)
    data = {"model": weights, "__author__": "torchvision", "matching_heuristics": True}
    write_atomically(output_path, lambda f: pickle.dump(data, f, protocol=2))
    return spec, dropped


def conversion_report(spec: ResNetSpec, dropped: Sequence[str], output_path: str) -> str:
    """What :func:`convert_torchvision_checkpoint` wrote and how to train from it, as printed by
    ``tools/convert_torchvision_to_d2.py``."""
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
