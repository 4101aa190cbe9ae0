"""Weights I/O shared by the converters: the ResNet key map and shapes, normalisation, paths.

Both converters write their output with :func:`save_weights`, atomically.
"""

import os
import re
import shlex
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import DCNv2Error
from .atomic import atomic_pickle, atomic_save

__all__ = [
    "CONVERTER_INPUT",
    "BN_FIELDS",
    "IMAGENET_RGB_MEAN",
    "IMAGENET_RGB_STD",
    "ConversionError",
    "ResNetSpec",
    "check_output_path",
    "check_shapes",
    "expected_resnet_shapes",
    "float_list",
    "format_overrides",
    "infer_resnet_spec",
    "resnet_key_to_d2",
    "save_weights",
]

# torchvision's (and MMDetection's) input normalisation: RGB, 0-255 scale.
IMAGENET_RGB_MEAN = (123.675, 116.28, 103.53)
IMAGENET_RGB_STD = (58.395, 57.12, 57.375)

# The tensors of a BatchNorm layer that carry weights (num_batches_tracked has no counterpart).
BN_FIELDS = ("weight", "bias", "running_mean", "running_var")
_BLOCKS_TO_DEPTH = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}


# Where a converter's input came from, in messages about it.
CONVERTER_INPUT = "the converter's input"


class ConversionError(DCNv2Error, ValueError):
    """The weights are not the architecture the converter maps (the message lists why)."""


def float_list(values: Sequence[float]) -> str:
    """``values`` as a detectron2 config value, e.g. ``"[123.675, 116.28, 103.53]"``."""
    return "[" + ", ".join(repr(float(v)) for v in values) + "]"


def _bn_d2(prefix: str, field: str) -> str:
    return f"{prefix}.norm.{field}"


def resnet_key_to_d2(key: str) -> Optional[str]:
    """detectron2 name of a torchvision-named ResNet tensor, or None if it has no counterpart."""
    m = re.fullmatch(r"conv1\.weight", key)
    if m:
        return "stem.conv1.weight"
    m = re.fullmatch(r"bn1\.(\w+)", key)
    if m and m[1] in BN_FIELDS:
        return _bn_d2("stem.conv1", m[1])
    m = re.fullmatch(r"layer([1-4])\.(\d+)\.(.+)", key)
    if not m:
        return None
    block, rest = f"res{int(m[1]) + 1}.{m[2]}", m[3]
    m = re.fullmatch(r"conv([1-3])\.weight", rest)
    if m:
        return f"{block}.conv{m[1]}.weight"
    m = re.fullmatch(r"bn([1-3])\.(\w+)", rest)
    if m and m[2] in BN_FIELDS:
        return _bn_d2(f"{block}.conv{m[1]}", m[2])
    if rest == "downsample.0.weight":
        return f"{block}.shortcut.weight"
    m = re.fullmatch(r"downsample\.1\.(\w+)", rest)
    if m and m[1] in BN_FIELDS:
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
            ("MODEL.PIXEL_MEAN", float_list(IMAGENET_RGB_MEAN)),
            ("MODEL.PIXEL_STD", float_list(IMAGENET_RGB_STD)),
        ]
        if self.stem_out_channels != 64:
            pairs.append(("MODEL.RESNETS.STEM_OUT_CHANNELS", str(self.stem_out_channels)))
        if self.res2_out_channels != 256:
            pairs.append(("MODEL.RESNETS.RES2_OUT_CHANNELS", str(self.res2_out_channels)))
        return pairs


def format_overrides(pairs: Sequence[Tuple[str, str]]) -> str:
    """The overrides as ``KEY VALUE`` arguments for ``train_net.py`` (shell-quoted)."""
    return " ".join(f"{k} {shlex.quote(v)}" for k, v in pairs)


def expected_resnet_shapes(spec: ResNetSpec, in_channels: int = 3) -> Dict[str, Tuple[int, ...]]:
    """Shape of every tensor of a torchvision-named bottleneck ResNet ``spec`` describes."""
    shapes: Dict[str, Tuple[int, ...]] = {}

    def conv_bn(conv: str, bn: str, out_c: int, in_c: int, k: int) -> None:
        shapes[f"{conv}.weight"] = (out_c, in_c, k, k)
        for field in BN_FIELDS:
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
    """The :class:`ResNetSpec` of torchvision-named ResNet tensors (name -> shape)."""
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
    """Raise a ConversionError listing each tensor of ``expected`` missing or misshapen."""
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


def check_output_path(input_path: str, output_path: str, overwrite: bool, suffixes: tuple) -> None:
    """Refuse a missing input, or an output that is the input, misnamed, or exists."""
    if "://" not in input_path and not os.path.exists(input_path):
        raise ConversionError(f"input {input_path!r} does not exist or is not a file")
    if not output_path.endswith(suffixes):
        raise ConversionError(
            f"output {output_path!r} must end with {' or '.join(suffixes)}, the format "
            "detectron2's checkpointer reads it as"
        )
    if os.path.abspath(input_path) == os.path.abspath(output_path):
        raise ConversionError("the output path is the input path; give another output file")
    if os.path.exists(output_path) and not overwrite:
        raise ConversionError(
            f"{output_path!r} exists; pass --force (formerly --overwrite) to replace it"
        )


def save_weights(data: Mapping, path: str) -> None:
    """Write converted weights to ``path`` atomically (``.pkl``: a protocol-2 pickle)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".pkl"):
        atomic_pickle(data, path)
    else:
        atomic_save(data, path)
