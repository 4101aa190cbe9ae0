"""Weights I/O shared by the converters: key renaming rules, the ResNet's shapes, paths.

Both converters write their output with :func:`save_weights`, atomically.
"""

import os
import re
import shlex
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import DCNv2Error
from .atomic import atomic_pickle, atomic_save
from .loading import load_torch_file

__all__ = ["ConversionError", "ResNetSpec", "rename_key", "save_weights"]

# torchvision's (and MMDetection's) input normalisation: RGB, 0-255 scale.
IMAGENET_RGB_MEAN = (123.675, 116.28, 103.53)
IMAGENET_RGB_STD = (58.395, 57.12, 57.375)
_BLOCKS_TO_DEPTH = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
# Where a converter's input came from, in messages about it.
CONVERTER_INPUT = "the converter's input"

# (pattern, template, shift): a key fully matching ``pattern`` becomes ``template`` formatted with
# its groups, the first one plus ``shift`` (torchvision's layer1 is detectron2's res2).
_BN = r"(weight|bias|running_mean|running_var)"
RESNET_RULES = (
    (r"conv1\.weight", "stem.conv1.weight", 0),
    (rf"bn1\.{_BN}", "stem.conv1.norm.{0}", 0),
    (r"layer([1-4])\.(\d+)\.conv([1-3])\.weight", "res{0}.{1}.conv{2}.weight", 1),
    (rf"layer([1-4])\.(\d+)\.bn([1-3])\.{_BN}", "res{0}.{1}.conv{2}.norm.{3}", 1),
    (r"layer([1-4])\.(\d+)\.downsample\.0\.weight", "res{0}.{1}.shortcut.weight", 1),
    (rf"layer([1-4])\.(\d+)\.downsample\.1\.{_BN}", "res{0}.{1}.shortcut.norm.{2}", 1),
)


class ConversionError(DCNv2Error, ValueError):
    """The weights are not the architecture the converter maps (the message lists why)."""


def rename_key(key: str, rules: Sequence[Tuple[str, str, int]]) -> Optional[str]:
    """``key`` renamed by the first of ``rules`` it fully matches, or None if none does."""
    for pattern, template, shift in rules:
        m = re.fullmatch(pattern, key)
        if m:
            groups = list(m.groups())
            if shift:
                groups[0] = int(groups[0]) + shift
            return template.format(*groups)
    return None


def float_list(values: Sequence[float]) -> str:
    """``values`` as a detectron2 config value, e.g. ``"[123.675, 116.28, 103.53]"``."""
    return "[" + ", ".join(repr(float(v)) for v in values) + "]"


def format_overrides(pairs: Sequence[Tuple[str, str]]) -> str:
    """The overrides as ``KEY VALUE`` arguments for ``train_net.py`` (shell-quoted)."""
    return " ".join(f"{k} {shlex.quote(v)}" for k, v in pairs)


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

    @property
    def name(self) -> str:
        """``R50``, ``X101-32x8d``."""
        if self.num_groups == 1:
            return f"R{self.depth}"
        return f"X{self.depth}-{self.num_groups}x{self.width_per_group}d"

    def overrides(
        self,
        stride_in_1x1: bool = False,
        input_format: str = "RGB",
        pixel_mean: Sequence[float] = IMAGENET_RGB_MEAN,
        pixel_std: Sequence[float] = IMAGENET_RGB_STD,
    ) -> List[Tuple[str, str]]:
        """``(KEY, VALUE)`` config overrides for these weights (default: torchvision's input)."""
        pairs = [
            ("MODEL.RESNETS.DEPTH", str(self.depth)),
            ("MODEL.RESNETS.NUM_GROUPS", str(self.num_groups)),
            ("MODEL.RESNETS.WIDTH_PER_GROUP", str(self.width_per_group)),
            ("MODEL.RESNETS.STRIDE_IN_1X1", str(stride_in_1x1)),
            ("INPUT.FORMAT", input_format),
            ("MODEL.PIXEL_MEAN", float_list(pixel_mean)),
            ("MODEL.PIXEL_STD", float_list(pixel_std)),
        ]
        for key, value, default in (
            ("MODEL.RESNETS.STEM_OUT_CHANNELS", self.stem_out_channels, 64),
            ("MODEL.RESNETS.RES2_OUT_CHANNELS", self.res2_out_channels, 256),
        ):
            if value != default:
                pairs.append((key, str(value)))
        return pairs


def expected_resnet_shapes(spec: ResNetSpec, in_channels: int = 3) -> Dict[str, Tuple[int, ...]]:
    """Shape of every tensor of a torchvision-named bottleneck ResNet ``spec`` describes."""
    shapes: Dict[str, Tuple[int, ...]] = {}

    def conv_bn(conv: str, bn: str, out_c: int, in_c: int, k: int) -> None:
        shapes[f"{conv}.weight"] = (out_c, in_c, k, k)
        for field in ("weight", "bias", "running_mean", "running_var"):
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
                "a ResNet-D (deep 3x3 stem 'stem.*'): the plugin's backbone has detectron2's 7x7 "
                "stem and strided 1x1 shortcuts"
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
    width, per_group = shapes["layer1.0.conv2.weight"][:2]  # (out, in / groups, 3, 3)
    return ResNetSpec(
        depth=depth,
        num_groups=int(width) // int(per_group),
        width_per_group=int(per_group),
        stem_out_channels=int(shapes["conv1.weight"][0]),
        res2_out_channels=int(shapes["layer1.0.conv3.weight"][0]),
    )


def check_shapes(
    shapes: Mapping[str, Sequence[int]], expected: Mapping[str, Tuple[int, ...]], what: str
) -> None:
    """Raise a ConversionError listing each tensor unexpected, missing or misshapen."""
    extra = [f"  no place: {k} {tuple(shapes[k])}" for k in sorted(shapes) if k not in expected]
    missing = [f"  missing: {k}" for k in sorted(expected) if k not in shapes]
    wrong = [
        f"  shape: {k}: {tuple(shapes[k])}, expected {expected[k]}"
        for k in sorted(expected)
        if k in shapes and tuple(shapes[k]) != expected[k]
    ]
    if extra or missing or wrong:
        head = f"{what}: {len(extra)} tensor(s) with no place in it, {len(missing)} missing, "
        head += f"{len(wrong)} with an unexpected shape"
        raise ConversionError("\n".join([head, *extra, *missing, *wrong]))


def read_input(
    input_path: str, output_path: str, suffixes: tuple, overwrite: bool, allow_unsafe: bool
) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """(state dict, ``meta``) of a converter's input (the state dict alone, or under ``state_dict``
    or ``model``), after refusing an output that is the input, misnamed, or exists."""
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
    checkpoint = load_torch_file(input_path, allow_unsafe=allow_unsafe, source=CONVERTER_INPUT)
    meta = {}
    if isinstance(checkpoint, Mapping):
        meta = checkpoint.get("meta") if isinstance(checkpoint.get("meta"), Mapping) else {}
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise ConversionError(
            f"{input_path!r} holds no state dict: expected a name -> tensor dict, or a dict "
            "holding one under 'state_dict' (MMDetection) or 'model'"
        )
    not_tensors = sorted(k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ConversionError(f"the state dict has non-tensor entries: {not_tensors[:5]}")
    state_dict = dict(checkpoint)
    if all(k.startswith("module.") for k in state_dict):  # saved from a DataParallel wrapper
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict, dict(meta)


def save_weights(data: Mapping, path: str) -> None:
    """Write converted weights to ``path`` atomically (``.pkl``: a protocol-2 pickle)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".pkl"):
        atomic_pickle(data, path)
    else:
        atomic_save(data, path)
