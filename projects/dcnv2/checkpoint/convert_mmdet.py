"""MMDetection (v2/v3) Faster / Mask R-CNN checkpoints (ResNet(X) + FPN, DCN) for detectron2.

Tensors are renamed, never reordered (the layouts agree); unknown, missing or misshapen tensors stop
the conversion with a list. The model is read from the shapes and the stored config text.
"""

import ast
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .loading import load_torch_file
from .weights_io import (
    CONVERTER_INPUT,
    IMAGENET_RGB_MEAN,
    IMAGENET_RGB_STD,
    ConversionError,
    ResNetSpec,
    check_output_path,
    check_shapes,
    expected_resnet_shapes,
    float_list,
    format_overrides,
    infer_resnet_spec,
    resnet_key_to_d2,
    save_weights,
)

__all__ = [
    "MMDetModelSpec",
    "conversion_report",
    "convert_mmdet_checkpoint",
    "convert_mmdet_state_dict",
    "expected_mmdet_shapes",
    "infer_mmdet_spec",
    "mmdet_key_to_d2",
]


@dataclass(frozen=True)
class MMDetModelSpec:
    """What a converted MMDetection R-CNN needs from the detectron2 config."""

    resnet: ResNetSpec
    deform_on_per_stage: Tuple[bool, bool, bool, bool]
    deform_modulated: bool
    deform_num_groups: int
    num_classes: int
    fpn_channels: int = 256
    num_anchors: int = 3
    fc_dim: int = 1024
    num_fc: int = 2
    cls_agnostic_bbox_reg: bool = False
    mask_on: bool = False
    num_mask_convs: int = 4
    cls_agnostic_mask: bool = False
    stride_in_1x1: bool = False
    input_format: str = "RGB"
    pixel_mean: Tuple[float, float, float] = IMAGENET_RGB_MEAN
    pixel_std: Tuple[float, float, float] = IMAGENET_RGB_STD
    # Where stride_in_1x1 / input_format / pixel_* come from: "meta config" or "defaults".
    preprocessing_source: str = "defaults"
    notes: Tuple[str, ...] = field(default=())

    def overrides(self) -> List[Tuple[str, str]]:
        """``(KEY, VALUE)`` detectron2 config overrides for the converted weights."""
        r = self.resnet
        pairs = [
            ("MODEL.RESNETS.DEPTH", str(r.depth)),
            ("MODEL.RESNETS.NUM_GROUPS", str(r.num_groups)),
            ("MODEL.RESNETS.WIDTH_PER_GROUP", str(r.width_per_group)),
            ("MODEL.RESNETS.STRIDE_IN_1X1", str(self.stride_in_1x1)),
            ("MODEL.RESNETS.DEFORM_ON_PER_STAGE", str(list(self.deform_on_per_stage))),
            ("MODEL.RESNETS.DEFORM_MODULATED", str(self.deform_modulated)),
            ("MODEL.RESNETS.DEFORM_NUM_GROUPS", str(self.deform_num_groups)),
            ("INPUT.FORMAT", self.input_format),
            ("MODEL.PIXEL_MEAN", float_list(self.pixel_mean)),
            ("MODEL.PIXEL_STD", float_list(self.pixel_std)),
            ("MODEL.ROI_HEADS.NUM_CLASSES", str(self.num_classes)),
            ("MODEL.MASK_ON", str(self.mask_on)),
        ]
        if r.stem_out_channels != 64:
            pairs.append(("MODEL.RESNETS.STEM_OUT_CHANNELS", str(r.stem_out_channels)))
        if r.res2_out_channels != 256:
            pairs.append(("MODEL.RESNETS.RES2_OUT_CHANNELS", str(r.res2_out_channels)))
        if self.fpn_channels != 256:
            pairs.append(("MODEL.FPN.OUT_CHANNELS", str(self.fpn_channels)))
        if self.fc_dim != 1024:
            pairs.append(("MODEL.ROI_BOX_HEAD.FC_DIM", str(self.fc_dim)))
        if self.num_fc != 2:
            pairs.append(("MODEL.ROI_BOX_HEAD.NUM_FC", str(self.num_fc)))
        if self.cls_agnostic_bbox_reg:
            pairs.append(("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True"))
        if self.mask_on and self.num_mask_convs != 4:
            pairs.append(("MODEL.ROI_MASK_HEAD.NUM_CONV", str(self.num_mask_convs)))
        if self.mask_on and self.cls_agnostic_mask:
            pairs.append(("MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", "True"))
        return pairs


def mmdet_key_to_d2(key: str) -> Optional[str]:
    """detectron2 name of an MMDetection Faster/Mask R-CNN tensor, or None if it has none."""
    if key.startswith("backbone."):
        rest = key[len("backbone.") :]
        m = re.fullmatch(
            r"layer([1-4])\.(\d+)\.conv2(?:\.conv_offset|_offset)\.(weight|bias)", rest
        )
        if m:
            return f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv2_offset.{m[3]}"
        d2 = resnet_key_to_d2(rest)
        return None if d2 is None else f"backbone.bottom_up.{d2}"
    table = [
        (r"neck\.lateral_convs\.([0-3])\.conv\.(weight|bias)", "backbone.fpn_lateral{}.{}", 2),
        (r"neck\.fpn_convs\.([0-3])\.conv\.(weight|bias)", "backbone.fpn_output{}.{}", 2),
        (r"roi_head\.bbox_head\.shared_fcs\.(\d+)\.(weight|bias)", "roi_heads.box_head.fc{}.{}", 1),
        (
            r"roi_head\.mask_head\.convs\.(\d+)\.conv\.(weight|bias)",
            "roi_heads.mask_head.mask_fcn{}.{}",
            1,
        ),
    ]
    for pattern, target, first in table:
        m = re.fullmatch(pattern, key)
        if m:
            return target.format(int(m[1]) + first, m[2])
    renames = {
        "rpn_head.rpn_conv": "proposal_generator.rpn_head.conv",
        "rpn_head.rpn_cls": "proposal_generator.rpn_head.objectness_logits",
        "rpn_head.rpn_reg": "proposal_generator.rpn_head.anchor_deltas",
        "roi_head.bbox_head.fc_cls": "roi_heads.box_predictor.cls_score",
        "roi_head.bbox_head.fc_reg": "roi_heads.box_predictor.bbox_pred",
        "roi_head.mask_head.upsample": "roi_heads.mask_head.deconv",
        "roi_head.mask_head.conv_logits": "roi_heads.mask_head.predictor",
    }
    module, _, param = key.rpartition(".")
    if module in renames and param in ("weight", "bias"):
        return f"{renames[module]}.{param}"
    return None


def _offset_key(shapes: Mapping[str, Sequence[int]], stage: int, block: int) -> Optional[str]:
    for name in (f"layer{stage}.{block}.conv2.conv_offset", f"layer{stage}.{block}.conv2_offset"):
        if f"{name}.weight" in shapes:
            return name
    return None


def _deformable_layout(
    backbone: Mapping[str, Sequence[int]],
    resnet: ResNetSpec,
    modulated_hint: Optional[bool],
) -> Tuple[Tuple[bool, ...], bool, int, Dict[str, str]]:
    """Deformable stages, DCNv2 or v1, deformable groups, and each block's offset-conv name."""
    per_stage, names, channels = [], {}, set()
    for stage, num_blocks in enumerate(resnet.blocks_per_stage, start=1):
        found = [_offset_key(backbone, stage, b) for b in range(num_blocks)]
        if any(found) and not all(found):
            raise ConversionError(
                f"layer{stage} has offset convs in some blocks only "
                f"({sum(map(bool, found))} of {num_blocks}); MMDetection's stage_with_dcn and "
                "the plugin's DEFORM_ON_PER_STAGE make a whole stage deformable"
            )
        per_stage.append(all(found))
        for b, name in enumerate(found):
            if name:
                names[f"layer{stage}.{b}"] = name
                channels.add(int(backbone[f"{name}.weight"][0]))
    if not names:
        return tuple(per_stage), True, 1, names
    if len(channels) != 1:
        raise ConversionError(f"the offset convs have different output channels {sorted(channels)}")
    (c,) = channels
    # mmcv's DCNv2 predicts 3*9 channels per deformable group (dy, dx, mask), DCN 2*9.
    candidates = {m: c // (27 if m else 18) for m in (True, False) if c % (27 if m else 18) == 0}
    if modulated_hint is not None:
        if modulated_hint not in candidates:
            kind = "DCNv2 (27 per group)" if modulated_hint else "DCN (18 per group)"
            raise ConversionError(f"offset convs with {c} output channels cannot be {kind}")
        candidates = {modulated_hint: candidates[modulated_hint]}
    if not candidates:
        raise ConversionError(
            f"offset convs with {c} output channels are neither DCNv2 (27 per deformable group) "
            "nor DCN (18 per deformable group)"
        )
    if len(candidates) > 1:
        raise ConversionError(
            f"offset convs with {c} output channels fit both DCNv2 with {candidates[True]} "
            f"deformable groups and DCN with {candidates[False]}, and the checkpoint's meta does "
            "not say which; pass deform_modulated=True/False (--deform-modulated true/false)"
        )
    ((modulated, groups),) = candidates.items()
    return tuple(per_stage), modulated, groups, names


def _meta_config_text(meta: Mapping[str, Any]) -> str:
    for key in ("config", "cfg"):  # MMDetection v2 / v3 store the config's text here
        if isinstance(meta.get(key), str):
            return meta[key]
    return ""


def _config_value(text: str, name: str) -> Optional[Any]:
    """The value of ``name=...`` in MMDetection config text when every occurrence agrees."""
    found = set()
    for m in re.finditer(rf"\b{name}\s*[=:]\s*['\"]?(\[[^\]]*\]|\(.*?\)|[\w.]+)", text):
        try:
            value = ast.literal_eval(m[1])
        except (ValueError, SyntaxError):
            value = m[1]
        found.add(tuple(value) if isinstance(value, (list, tuple)) else value)
    return found.pop() if len(found) == 1 else None


def _dcn_modulated_from_config(text: str) -> Optional[bool]:
    """DCNv2 (True) or DCN (False) as the config's ``dcn=dict(...)`` says, if it says."""
    kinds = set()
    for m in re.finditer(r"\bdcn\s*[=:]\s*dict\(([^)]*)\)", text):
        body = m[1]
        kind = re.search(r"type\s*[=:]\s*['\"](\w+)['\"]", body)
        legacy = re.search(r"modulated\s*[=:]\s*(True|False)", body)  # MMDetection v1
        if kind and kind[1] in ("DCNv2", "ModulatedDeformConv2dPack", "ModulatedDeformConvPack"):
            kinds.add(True)
        elif kind and kind[1] in ("DCN", "DeformConv2dPack", "DeformConvPack"):
            kinds.add(False)
        elif legacy:
            kinds.add(legacy[1] == "True")
    return kinds.pop() if len(kinds) == 1 else None


def infer_mmdet_spec(
    shapes: Mapping[str, Sequence[int]],
    meta: Optional[Mapping[str, Any]] = None,
    deform_modulated: Optional[bool] = None,
) -> Tuple[MMDetModelSpec, Dict[str, str]]:
    """The model an MMDetection state dict (name -> shape) belongs to.

    Args:
        meta: the checkpoint's ``meta``; its config text gives the ResNet style and normalisation.
        deform_modulated: DCNv2 (True) or DCN (False) when the offset channels fit both.

    Returns:
        (spec, offset_names): the spec, and the offset-conv prefix of each deformable block.
    """
    meta = meta or {}
    if any(k.startswith(("bbox_head.", "mask_head.")) for k in shapes):
        raise ConversionError(
            "heads without the 'roi_head.' prefix: an MMDetection v1.x checkpoint; upgrade it "
            "with MMDetection's tools/model_converters/upgrade_model_version.py first"
        )
    for required in ("backbone.", "neck.", "rpn_head.", "roi_head.bbox_head."):
        if not any(k.startswith(required) for k in shapes):
            raise ConversionError(
                f"no '{required}*' tensors: expected a two-stage MMDetection detector (Faster or "
                "Mask R-CNN with a ResNet backbone, an FPN neck, RPNHead and Shared2FCBBoxHead)"
            )
    backbone = {k[len("backbone.") :]: v for k, v in shapes.items() if k.startswith("backbone.")}
    resnet = infer_resnet_spec(backbone)
    text = _meta_config_text(meta)
    if deform_modulated is None and text:
        deform_modulated = _dcn_modulated_from_config(text)
    per_stage, modulated, groups, offset_names = _deformable_layout(
        backbone, resnet, deform_modulated
    )
    cls = shapes.get("roi_head.bbox_head.fc_cls.weight")
    reg = shapes.get("roi_head.bbox_head.fc_reg.weight")
    if cls is None or reg is None:
        raise ConversionError(
            "the box head has no fc_cls/fc_reg (roi_head.bbox_head.fc_cls.weight)"
        )
    num_classes = int(cls[0]) - 1
    num_fc = len(
        {k.split(".")[3] for k in shapes if k.startswith("roi_head.bbox_head.shared_fcs.")}
    )
    mask_convs = {k.split(".")[3] for k in shapes if k.startswith("roi_head.mask_head.convs.")}
    logits = shapes.get("roi_head.mask_head.conv_logits.weight")
    style = _config_value(text, "style") if text else None
    mean = _config_value(text, "mean") if text else None
    std = _config_value(text, "std") if text else None
    to_rgb = None
    if text:
        to_rgb = _config_value(text, "bgr_to_rgb")
        to_rgb = _config_value(text, "to_rgb") if to_rgb is None else to_rgb
    from_meta = all(v is not None for v in (style, mean, std, to_rgb))
    notes = []
    if not from_meta:
        notes.append(
            "the checkpoint's meta does not give the ResNet style and input normalisation; "
            "assumed MMDetection's defaults (style='pytorch', RGB, ImageNet mean/std)"
        )
    lat = shapes.get("neck.lateral_convs.0.conv.weight", (256,))
    rpn_cls = shapes.get("rpn_head.rpn_cls.weight", (3,))
    fc0 = shapes.get("roi_head.bbox_head.shared_fcs.0.weight", (1024,))
    spec = MMDetModelSpec(
        resnet=resnet,
        deform_on_per_stage=tuple(per_stage),
        deform_modulated=modulated,
        deform_num_groups=groups,
        num_classes=num_classes,
        fpn_channels=int(lat[0]),
        num_anchors=int(rpn_cls[0]),
        fc_dim=int(fc0[0]),
        num_fc=num_fc,
        cls_agnostic_bbox_reg=int(reg[0]) == 4 and num_classes != 1,
        mask_on=logits is not None,
        num_mask_convs=len(mask_convs),
        cls_agnostic_mask=logits is not None and int(logits[0]) == 1 and num_classes != 1,
        stride_in_1x1=from_meta and style == "caffe",
        input_format=("RGB" if to_rgb else "BGR") if from_meta else "RGB",
        pixel_mean=tuple(float(v) for v in mean) if from_meta else IMAGENET_RGB_MEAN,
        pixel_std=tuple(float(v) for v in std) if from_meta else IMAGENET_RGB_STD,
        preprocessing_source="meta config" if from_meta else "defaults",
        notes=tuple(notes),
    )
    return spec, offset_names


def expected_mmdet_shapes(
    spec: MMDetModelSpec, offset_names: Mapping[str, str]
) -> Dict[str, Tuple[int, ...]]:
    """Shape of every tensor (``num_batches_tracked`` aside) of the MMDetection model ``spec``."""
    shapes = {f"backbone.{k}": v for k, v in expected_resnet_shapes(spec.resnet).items()}
    r = spec.resnet
    width = r.num_groups * r.width_per_group
    per_group = (27 if spec.deform_modulated else 18) * spec.deform_num_groups
    for block, name in offset_names.items():
        stage = int(block[len("layer")])
        w = width * 2 ** (stage - 1)
        shapes[f"backbone.{name}.weight"] = (per_group, w, 3, 3)
        shapes[f"backbone.{name}.bias"] = (per_group,)
    f = spec.fpn_channels
    for i in range(4):
        in_c = r.res2_out_channels * 2**i
        shapes[f"neck.lateral_convs.{i}.conv.weight"] = (f, in_c, 1, 1)
        shapes[f"neck.lateral_convs.{i}.conv.bias"] = (f,)
        shapes[f"neck.fpn_convs.{i}.conv.weight"] = (f, f, 3, 3)
        shapes[f"neck.fpn_convs.{i}.conv.bias"] = (f,)
    a = spec.num_anchors
    for name, out_c, k in (("rpn_conv", f, 3), ("rpn_cls", a, 1), ("rpn_reg", 4 * a, 1)):
        shapes[f"rpn_head.{name}.weight"] = (out_c, f, k, k)
        shapes[f"rpn_head.{name}.bias"] = (out_c,)
    in_c = f * 7 * 7
    for i in range(spec.num_fc):
        shapes[f"roi_head.bbox_head.shared_fcs.{i}.weight"] = (spec.fc_dim, in_c)
        shapes[f"roi_head.bbox_head.shared_fcs.{i}.bias"] = (spec.fc_dim,)
        in_c = spec.fc_dim
    k = spec.num_classes
    reg = 4 if spec.cls_agnostic_bbox_reg else 4 * k
    for name, out_c in (("fc_cls", k + 1), ("fc_reg", reg)):
        shapes[f"roi_head.bbox_head.{name}.weight"] = (out_c, in_c)
        shapes[f"roi_head.bbox_head.{name}.bias"] = (out_c,)
    if spec.mask_on:
        for i in range(spec.num_mask_convs):
            shapes[f"roi_head.mask_head.convs.{i}.conv.weight"] = (f, f, 3, 3)
            shapes[f"roi_head.mask_head.convs.{i}.conv.bias"] = (f,)
        shapes["roi_head.mask_head.upsample.weight"] = (f, f, 2, 2)  # ConvTranspose2d: in, out
        shapes["roi_head.mask_head.upsample.bias"] = (f,)
        logits = 1 if spec.cls_agnostic_mask else k
        shapes["roi_head.mask_head.conv_logits.weight"] = (logits, f, 1, 1)
        shapes["roi_head.mask_head.conv_logits.bias"] = (logits,)
    return shapes


def _split_checkpoint(checkpoint: Any, path: str) -> Tuple[Dict[str, torch.Tensor], Dict]:
    meta = {}
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        meta = checkpoint.get("meta") if isinstance(checkpoint.get("meta"), Mapping) else {}
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise ConversionError(
            f"{path!r} holds no state dict: expected MMDetection's {{'meta', 'state_dict'}} "
            "checkpoint or a plain name -> tensor dict"
        )
    not_tensors = sorted(k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ConversionError(f"the state dict has non-tensor entries: {not_tensors[:5]}")
    state_dict = dict(checkpoint)
    if all(k.startswith("module.") for k in state_dict):  # saved from a DataParallel wrapper
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict, dict(meta)


def _dropped(key: str) -> bool:
    # BN counters have no detectron2 counterpart; v3's data_preprocessor holds no weights.
    return key.endswith("num_batches_tracked") or key.startswith("data_preprocessor.")


def convert_mmdet_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    meta: Optional[Mapping[str, Any]] = None,
    deform_modulated: Optional[bool] = None,
) -> Tuple[Dict[str, torch.Tensor], MMDetModelSpec]:
    """Rename an MMDetection R-CNN state dict to this plugin's names; return (weights, spec).

    Raises:
        ConversionError: listing every unplaceable, missing or misshapen tensor.
    """
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    spec, offset_names = infer_mmdet_spec(shapes, meta, deform_modulated)
    unmapped = sorted(k for k in shapes if not _dropped(k) and mmdet_key_to_d2(k) is None)
    if unmapped:
        raise ConversionError(
            f"{len(unmapped)} tensor(s) have no place in a detectron2 Faster/Mask R-CNN with a "
            "ResNet+FPN backbone, StandardRPNHead, FastRCNNConvFCHead and "
            "MaskRCNNConvUpsampleHead:\n" + "\n".join(f"  {k} {shapes[k]}" for k in unmapped)
        )
    kept = {k: v for k, v in shapes.items() if not _dropped(k)}
    expected = expected_mmdet_shapes(spec, offset_names)
    extra = sorted(k for k in kept if k not in expected)
    if extra:
        raise ConversionError(
            f"{len(extra)} tensor(s) do not belong to the model the checkpoint describes "
            f"({spec.resnet.depth} layers, {spec.num_classes} classes):\n"
            + "\n".join(f"  {k} {shapes[k]}" for k in extra)
        )
    check_shapes(kept, expected, "MMDetection checkpoint")
    weights = {mmdet_key_to_d2(k): state_dict[k].detach().cpu().clone() for k in kept}
    return weights, spec


def convert_mmdet_checkpoint(
    input_path: str,
    output_path: str,
    *,
    allow_unsafe: bool = False,
    overwrite: bool = False,
    deform_modulated: Optional[bool] = None,
) -> MMDetModelSpec:
    """Convert an MMDetection checkpoint file into a detectron2 ``.pth`` for ``MODEL.WEIGHTS``.

    Args:
        output_path: the ``.pth`` to write atomically, with ``"model"``, ``"config_overrides"`` and
            ``"classes"``.
        allow_unsafe: load an input that needs arbitrary pickled objects (trusted files only).

    Returns:
        The model spec; ``spec.overrides()`` are the config keys the weights need.
    """
    check_output_path(input_path, output_path, overwrite, (".pth", ".pt"))
    raw = load_torch_file(input_path, allow_unsafe=allow_unsafe, source=CONVERTER_INPUT)
    state_dict, meta = _split_checkpoint(raw, input_path)
    weights, spec = convert_mmdet_state_dict(state_dict, meta, deform_modulated)
    classes = meta.get("CLASSES") or (meta.get("dataset_meta") or {}).get("classes") or ()
    data = {
        "model": weights,
        "__author__": "MMDetection, converted by dcnv2.checkpoint.convert_mmdet",
        "config_overrides": [x for pair in spec.overrides() for x in pair],
        "classes": [str(c) for c in classes],
    }
    save_weights(data, output_path)
    return spec


def conversion_report(spec: MMDetModelSpec, output_path: str) -> str:
    """What :func:`convert_mmdet_checkpoint` wrote and the overrides to use it with."""
    stages = [f"res{i + 2}" for i, on in enumerate(spec.deform_on_per_stage) if on]
    dcn = (
        f"{'DCNv2 (mdconv)' if spec.deform_modulated else 'DCN (dconv)'} in {', '.join(stages)}, "
        f"{spec.deform_num_groups} deformable group(s)"
        if stages
        else "no deformable convs"
    )
    r = spec.resnet
    arch = f"R{r.depth}" if r.num_groups == 1 else f"X{r.depth}-{r.num_groups}x{r.width_per_group}d"
    head = "Mask R-CNN" if spec.mask_on else "Faster R-CNN"
    mask_yaml = "mask_rcnn" if spec.mask_on else "faster_rcnn"
    lines = [
        f"wrote {output_path}: {head}, {arch}-FPN, {dcn}, {spec.num_classes} classes",
        *(
            ["ResNet style and input normalisation: read from the checkpoint's meta config"]
            if spec.preprocessing_source == "meta config"
            else []
        ),
        *[f"note: {n}" for n in spec.notes],
        "config overrides these weights need:",
        "  " + format_overrides(spec.overrides()),
        "evaluate, for example:",
        f"  python train_net.py --config-file configs/mmdet/{mask_yaml}"
        f"_R50_mdconv_FPN_1x_mmdet.yaml --eval-only MODEL.WEIGHTS {output_path} "
        + format_overrides(spec.overrides()),
    ]
    return "\n".join(lines)
