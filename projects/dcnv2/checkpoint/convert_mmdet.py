"""MMDetection (v2/v3) Faster / Mask R-CNN checkpoints (ResNet(X) + FPN, DCN) for detectron2.

Tensors are renamed, never reordered (the layouts agree); unknown, missing or misshapen tensors stop
the conversion with a list. The model is read from the shapes and the stored config text.
"""

import ast
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .weights_io import (
    IMAGENET_RGB_MEAN,
    IMAGENET_RGB_STD,
    RESNET_RULES,
    ConversionError,
    ResNetSpec,
    check_shapes,
    expected_resnet_shapes,
    format_overrides,
    infer_resnet_spec,
    read_input,
    rename_key,
    save_weights,
)

__all__ = ["conversion_report", "convert_mmdet_checkpoint", "convert_mmdet_state_dict"]

# weights_io.rename_key's rules from MMDetection's names to this plugin's; the names were checked
# against the model's (expected_mmdet_shapes) before. Offset convs are named as in mmcv >= 1.
_BACKBONE_RULES = RESNET_RULES + (
    (r"layer(\d)\.(\d+)\.conv2\.conv_offset\.(\w+)", "res{0}.{1}.conv2_offset.{2}", 1),
)
_RENAMES = {
    "rpn_head.rpn_conv": "proposal_generator.rpn_head.conv",
    "rpn_head.rpn_cls": "proposal_generator.rpn_head.objectness_logits",
    "rpn_head.rpn_reg": "proposal_generator.rpn_head.anchor_deltas",
    "roi_head.bbox_head.fc_cls": "roi_heads.box_predictor.cls_score",
    "roi_head.bbox_head.fc_reg": "roi_heads.box_predictor.bbox_pred",
    "roi_head.mask_head.upsample": "roi_heads.mask_head.deconv",
    "roi_head.mask_head.conv_logits": "roi_heads.mask_head.predictor",
}
MMDET_RULES = (
    *((rf"backbone\.{p}", f"backbone.bottom_up.{t}", s) for p, t, s in _BACKBONE_RULES),
    (r"neck\.lateral_convs\.(\d)\.conv\.(\w+)", "backbone.fpn_lateral{0}.{1}", 2),
    (r"neck\.fpn_convs\.(\d)\.conv\.(\w+)", "backbone.fpn_output{0}.{1}", 2),
    (r"roi_head\.bbox_head\.shared_fcs\.(\d+)\.(\w+)", "roi_heads.box_head.fc{0}.{1}", 1),
    (r"roi_head\.mask_head\.convs\.(\d+)\.conv\.(\w+)", "roi_heads.mask_head.mask_fcn{0}.{1}", 1),
    *((rf"{re.escape(m)}\.(\w+)", f"{d2}.{{0}}", 0) for m, d2 in _RENAMES.items()),
)


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

    def overrides(self) -> List[Tuple[str, str]]:
        """``(KEY, VALUE)`` detectron2 config overrides for the converted weights."""
        pairs = self.resnet.overrides(
            self.stride_in_1x1, self.input_format, self.pixel_mean, self.pixel_std
        ) + [
            ("MODEL.RESNETS.DEFORM_ON_PER_STAGE", str(list(self.deform_on_per_stage))),
            ("MODEL.RESNETS.DEFORM_MODULATED", str(self.deform_modulated)),
            ("MODEL.RESNETS.DEFORM_NUM_GROUPS", str(self.deform_num_groups)),
            ("MODEL.ROI_HEADS.NUM_CLASSES", str(self.num_classes)),
            ("MODEL.MASK_ON", str(self.mask_on)),
        ]
        for key, value, default in (
            ("MODEL.FPN.OUT_CHANNELS", self.fpn_channels, 256),
            ("MODEL.ROI_BOX_HEAD.FC_DIM", self.fc_dim, 1024),
            ("MODEL.ROI_BOX_HEAD.NUM_FC", self.num_fc, 2),
            ("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", self.cls_agnostic_bbox_reg, False),
            ("MODEL.ROI_MASK_HEAD.NUM_CONV", self.num_mask_convs if self.mask_on else 4, 4),
            ("MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", self.cls_agnostic_mask, False),
        ):
            if value != default:
                pairs.append((key, str(value)))
        return pairs


def _deformable_layout(
    backbone: Mapping[str, Sequence[int]], resnet: ResNetSpec, modulated_hint: Optional[bool]
) -> Tuple[Tuple[bool, ...], bool, int]:
    """Deformable stages, DCNv2 (True) or DCN, and the deformable groups."""
    per_stage, offsets = [], []
    for stage, num_blocks in enumerate(resnet.blocks_per_stage, start=1):
        names = [f"layer{stage}.{b}.conv2.conv_offset.weight" for b in range(num_blocks)]
        found = [name for name in names if name in backbone]
        if found and len(found) < num_blocks:
            raise ConversionError(
                f"layer{stage} has offset convs in {len(found)} of {num_blocks} blocks; "
                "stage_with_dcn and DEFORM_ON_PER_STAGE make a whole stage deformable"
            )
        per_stage.append(bool(found))
        offsets += found
    if not offsets:
        return tuple(per_stage), True, 1
    c = int(backbone[offsets[0]][0])  # the shape check reports offset convs that differ
    # mmcv's DCNv2 predicts 3*9 channels per deformable group (dy, dx, mask), DCN 2*9.
    candidates = {m: c // (27 if m else 18) for m in (True, False) if c % (27 if m else 18) == 0}
    if modulated_hint is not None:
        candidates = {m: g for m, g in candidates.items() if m == modulated_hint}
    if not candidates:
        kind = {True: "DCNv2", False: "DCN"}.get(modulated_hint, "DCNv2 or DCN")
        raise ConversionError(
            f"offset convs with {c} output channels cannot be {kind} (DCNv2 has 27 per deformable "
            "group, DCN 18)"
        )
    if len(candidates) > 1:
        raise ConversionError(
            f"offset convs with {c} output channels fit both DCNv2 with {candidates[True]} "
            f"deformable groups and DCN with {candidates[False]}, and the checkpoint's meta does "
            "not say which; pass deform_modulated=True/False (--deform-modulated true/false)"
        )
    ((modulated, groups),) = candidates.items()
    return tuple(per_stage), modulated, groups


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


# mmcv's deformable conv types, modulated (DCNv2) and not (DCN).
_MODULATED = ("DCNv2", "ModulatedDeformConv2dPack", "ModulatedDeformConvPack")
_UNMODULATED = ("DCN", "DeformConv2dPack", "DeformConvPack")


def _dcn_modulated_from_config(text: str) -> Optional[bool]:
    """DCNv2 (True) or DCN (False) as the config's ``dcn=dict(...)`` says, if it says."""
    kinds = set()
    for body in re.findall(r"\bdcn\s*[=:]\s*dict\(([^)]*)\)", text):
        kind = re.search(r"type\s*[=:]\s*['\"](\w+)['\"]", body)
        legacy = re.search(r"modulated\s*[=:]\s*(True|False)", body)  # MMDetection v1
        if kind and kind[1] in _MODULATED + _UNMODULATED:
            kinds.add(kind[1] in _MODULATED)
        elif legacy:
            kinds.add(legacy[1] == "True")
    return kinds.pop() if len(kinds) == 1 else None


def infer_mmdet_spec(
    shapes: Mapping[str, Sequence[int]],
    meta: Optional[Mapping[str, Any]] = None,
    deform_modulated: Optional[bool] = None,
) -> MMDetModelSpec:
    """The model an MMDetection state dict (name -> shape) belongs to.

    Args:
        meta: the checkpoint's ``meta``; its config text gives the ResNet style and normalisation.
        deform_modulated: DCNv2 (True) or DCN (False) when the offset channels fit both.
    """
    meta = meta or {}
    if any(k.startswith(("bbox_head.", "mask_head.")) for k in shapes):
        raise ConversionError(
            "heads without the 'roi_head.' prefix: an MMDetection v1.x checkpoint; upgrade it "
            "with MMDetection's tools/model_converters/upgrade_model_version.py first"
        )
    for required in ("backbone.", "neck.", "rpn_head.", "roi_head.bbox_head.fc_cls."):
        if not any(k.startswith(required) for k in shapes):
            raise ConversionError(
                f"no '{required}*' tensors: expected a two-stage MMDetection detector (Faster or "
                "Mask R-CNN with a ResNet backbone, an FPN neck, RPNHead and Shared2FCBBoxHead)"
            )
    backbone = {k[len("backbone.") :]: v for k, v in shapes.items() if k.startswith("backbone.")}
    resnet = infer_resnet_spec(backbone)
    # MMDetection v2 / v3 store the config's text under "config" / "cfg".
    text = next((t for t in (meta.get("config"), meta.get("cfg")) if isinstance(t, str)), "")
    if deform_modulated is None:
        deform_modulated = _dcn_modulated_from_config(text)
    per_stage, modulated, groups = _deformable_layout(backbone, resnet, deform_modulated)
    num_classes = int(shapes["roi_head.bbox_head.fc_cls.weight"][0]) - 1
    num_fc = len(
        {k.split(".")[3] for k in shapes if k.startswith("roi_head.bbox_head.shared_fcs.")}
    )
    mask_convs = {k.split(".")[3] for k in shapes if k.startswith("roi_head.mask_head.convs.")}
    reg = shapes.get("roi_head.bbox_head.fc_reg.weight", (0,))
    logits = shapes.get("roi_head.mask_head.conv_logits.weight")
    style, mean, std = (_config_value(text, name) for name in ("style", "mean", "std"))
    to_rgb = _config_value(text, "bgr_to_rgb")
    to_rgb = _config_value(text, "to_rgb") if to_rgb is None else to_rgb
    from_meta = all(v is not None for v in (style, mean, std, to_rgb))
    return MMDetModelSpec(
        resnet=resnet,
        deform_on_per_stage=tuple(per_stage),
        deform_modulated=modulated,
        deform_num_groups=groups,
        num_classes=num_classes,
        fpn_channels=int(shapes.get("neck.lateral_convs.0.conv.weight", (256,))[0]),
        num_anchors=int(shapes.get("rpn_head.rpn_cls.weight", (3,))[0]),
        fc_dim=int(shapes.get("roi_head.bbox_head.shared_fcs.0.weight", (1024,))[0]),
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
    )


def expected_mmdet_shapes(spec: MMDetModelSpec) -> Dict[str, Tuple[int, ...]]:
    """Shape of every tensor (``num_batches_tracked`` aside) of the MMDetection model ``spec``."""
    r, f, k = spec.resnet, spec.fpn_channels, spec.num_classes
    shapes = {f"backbone.{n}": s for n, s in expected_resnet_shapes(r).items()}

    def add(name: str, *weight_shape: int) -> None:
        shapes[f"{name}.weight"] = weight_shape
        shapes[f"{name}.bias"] = weight_shape[:1]

    offset_channels = (27 if spec.deform_modulated else 18) * spec.deform_num_groups
    width = r.num_groups * r.width_per_group
    for stage, num_blocks in enumerate(r.blocks_per_stage, start=1):
        for b in range(num_blocks) if spec.deform_on_per_stage[stage - 1] else ():
            w = width * 2 ** (stage - 1)
            add(f"backbone.layer{stage}.{b}.conv2.conv_offset", offset_channels, w, 3, 3)
    for i in range(4):
        add(f"neck.lateral_convs.{i}.conv", f, r.res2_out_channels * 2**i, 1, 1)
        add(f"neck.fpn_convs.{i}.conv", f, f, 3, 3)
    a = spec.num_anchors
    add("rpn_head.rpn_conv", f, f, 3, 3)
    add("rpn_head.rpn_cls", a, f, 1, 1)
    add("rpn_head.rpn_reg", 4 * a, f, 1, 1)
    in_c = f * 7 * 7
    for i in range(spec.num_fc):
        add(f"roi_head.bbox_head.shared_fcs.{i}", spec.fc_dim, in_c)
        in_c = spec.fc_dim
    add("roi_head.bbox_head.fc_cls", k + 1, in_c)
    add("roi_head.bbox_head.fc_reg", 4 if spec.cls_agnostic_bbox_reg else 4 * k, in_c)
    if spec.mask_on:
        for i in range(spec.num_mask_convs):
            add(f"roi_head.mask_head.convs.{i}.conv", f, f, 3, 3)
        shapes["roi_head.mask_head.upsample.weight"] = (f, f, 2, 2)  # ConvTranspose2d: in, out
        shapes["roi_head.mask_head.upsample.bias"] = (f,)
        add("roi_head.mask_head.conv_logits", 1 if spec.cls_agnostic_mask else k, f, 1, 1)
    return shapes


def convert_mmdet_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    meta: Optional[Mapping[str, Any]] = None,
    deform_modulated: Optional[bool] = None,
) -> Tuple[Dict[str, torch.Tensor], MMDetModelSpec]:
    """Rename an MMDetection R-CNN state dict to this plugin's names; return (weights, spec)."""
    # BN counters have no detectron2 counterpart; v3's data_preprocessor holds no weights. The
    # offset convs' pre-v2 name (layerX.Y.conv2_offset) is the one mmcv still upgrades.
    kept = {
        k.replace(".conv2_offset.", ".conv2.conv_offset."): v
        for k, v in state_dict.items()
        if not (k.endswith("num_batches_tracked") or k.startswith("data_preprocessor."))
    }
    shapes = {k: tuple(v.shape) for k, v in kept.items()}
    spec = infer_mmdet_spec(shapes, meta, deform_modulated)
    check_shapes(
        shapes,
        expected_mmdet_shapes(spec),
        f"the MMDetection checkpoint ({spec.resnet.name}, {spec.num_classes} classes) does not "
        "fit a detectron2 Faster/Mask R-CNN with a ResNet+FPN backbone, StandardRPNHead, "
        "FastRCNNConvFCHead and MaskRCNNConvUpsampleHead",
    )
    weights = {rename_key(k, MMDET_RULES): v.detach().cpu().clone() for k, v in kept.items()}
    return weights, spec


def convert_mmdet_checkpoint(
    input_path: str,
    output_path: str,
    *,
    allow_unsafe: bool = False,
    overwrite: bool = False,
    deform_modulated: Optional[bool] = None,
) -> MMDetModelSpec:
    """Convert an MMDetection checkpoint into a detectron2 ``.pth`` (``"model"``,
    ``"config_overrides"``, ``"classes"``); ``allow_unsafe``: unpickle anything (trusted files).

    Returns:
        The model spec; ``spec.overrides()`` are the config keys the weights need.
    """
    suffixes = (".pth", ".pt")
    state_dict, meta = read_input(input_path, output_path, suffixes, overwrite, allow_unsafe)
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
    dcn = "DCNv2 (mdconv)" if spec.deform_modulated else "DCN (dconv)"
    dcn = f"{dcn} in {', '.join(stages)}, {spec.deform_num_groups} deformable group(s)"
    head = "Mask" if spec.mask_on else "Faster"
    config = f"configs/mmdet/{head.lower()}_rcnn_R50_mdconv_FPN_1x_mmdet.yaml"
    source = "ResNet style and input normalisation: read from the checkpoint's meta config"
    if spec.preprocessing_source != "meta config":
        source = (
            "note: the checkpoint's meta does not give the ResNet style and input normalisation; "
            "assumed MMDetection's defaults (style='pytorch', RGB, ImageNet mean/std)"
        )
    overrides = format_overrides(spec.overrides())
    return (
        f"wrote {output_path}: {head} R-CNN, {spec.resnet.name}-FPN, "
        f"{dcn if stages else 'no deformable convs'}, {spec.num_classes} classes\n{source}\n"
        f"config overrides these weights need:\n  {overrides}\nevaluate, for example:\n"
        f"  python train_net.py --config-file {config} --eval-only MODEL.WEIGHTS {output_path} "
        + overrides
    )
