"""Export dcnv2 models: ONNX of the detector or of the backbone + FPN (deformable convs as
standard ``DeformConv`` nodes, opset >= 19, or decomposed), and TorchScript. Models with mdpool
cannot be exported (:class:`ExportError`)."""

import collections
import contextlib
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import DCNv2Error
from ..layers import DeformConv, ModulatedDeformConv, ModulatedDeformRoIAlign

ONNX_OPSET = 19


class ExportError(DCNv2Error, ValueError):
    """A model (or a part of it) that the chosen export format cannot represent."""


@contextlib.contextmanager
def deform_backend(model: nn.Module, backend: str, native_impl: str = "auto") -> Iterator[None]:
    """Temporarily run every deformable conv of ``model`` with ``backend`` (and ``native_impl``)."""
    convs = [m for m in model.modules() if isinstance(m, (DeformConv, ModulatedDeformConv))]
    saved = [(m.backend, m.native_impl) for m in convs]
    try:
        for m in convs:
            m.backend, m.native_impl = backend, native_impl
        yield
    finally:
        for m, (b, impl) in zip(convs, saved):
            m.backend, m.native_impl = b, impl


def _check_exportable(model: nn.Module) -> None:
    if any(isinstance(m, ModulatedDeformRoIAlign) for m in model.modules()):
        raise ExportError(
            "This model uses modulated deformable RoI pooling (MODEL.DCNV2 mdpool), which has "
            "no ONNX export; export a model without it (e.g. faster_rcnn_R50_mdconv_FPN_1x)"
        )


def _deform_conv_symbolic(
    g, x, offset, mask, weight, bias, stride, padding, dilation, groups, dg, backend, impl
):
    """dcnv2::deform_conv2d -> ONNX DeformConv(X, W, offset, B, mask)."""
    from torch.onnx import symbolic_helper as sh

    stride, padding, dilation = (sh._get_const(v, "is", n) for v, n in (
        (stride, "stride"), (padding, "padding"), (dilation, "dilation")))  # fmt: skip
    groups, dg = sh._get_const(groups, "i", "groups"), sh._get_const(dg, "i", "groups")
    if sh._is_none(bias):
        # DeformConv's optional inputs are positional: B comes before mask.
        bias = g.op("Constant", value_t=torch.zeros(sh._get_tensor_sizes(weight)[0]))
    inputs = [x, weight, offset, bias] + ([] if sh._is_none(mask) else [mask])
    return g.op(
        "DeformConv",
        *inputs,
        dilations_i=list(dilation),
        group_i=groups,
        offset_group_i=dg,
        pads_i=list(padding) * 2,
        strides_i=list(stride),
    )


def trace_detector(model: nn.Module, inputs: List[Dict]) -> Tuple[torch.jit.ScriptModule, object]:
    """Trace a meta-architecture (eval mode) on ``[{"image": (3, H, W)}]``; returns the traced
    module and the ``TracingAdapter`` that rebuilds its outputs."""
    from detectron2.export import TracingAdapter

    with deform_backend(model, "torchvision"), torch.no_grad():
        adapter = TracingAdapter(model, [{"image": x["image"]} for x in inputs]).eval()
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    return traced, adapter


def detector_outputs(traced: torch.jit.ScriptModule, adapter, inputs: List[Dict]) -> List:
    """Run a traced detector and rebuild the eager model's outputs (images of the traced size)."""
    with torch.no_grad():
        return adapter.outputs_schema(traced(*(x["image"] for x in inputs)))


class BackboneForExport(nn.Module):
    """Backbone (+ FPN) as a module: (N, 3, H, W) 0-255 image in ``cfg.INPUT.FORMAT`` order to
    the features in ``output_names`` order."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = model.backbone
        self.register_buffer("pixel_mean", model.pixel_mean.clone(), persistent=False)
        self.register_buffer("pixel_std", model.pixel_std.clone(), persistent=False)
        self.output_names = list(self.backbone.output_shape())

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        features = self.backbone((image - self.pixel_mean) / self.pixel_std)
        return tuple(features[name] for name in self.output_names)


def _onnx_export_traced(module, args, path, input_names, output_names, dynamic_axes, opset):
    """torch.onnx.export's TorchScript-based exporter, deformable convs as DeformConv."""
    if opset < ONNX_OPSET:
        raise ValueError(f"ONNX DeformConv needs opset >= {ONNX_OPSET}, got {opset}")
    torch.onnx.register_custom_op_symbolic("dcnv2::deform_conv2d", _deform_conv_symbolic, opset)
    with deform_backend(module, "native"), torch.no_grad():
        torch.onnx.export(
            module,
            args,
            path,
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
        )


def _decompose_deform_conv(
    input, offset, mask, weight, bias, stride, padding, dilation, groups, dg, *names
):
    """dcnv2::deform_conv2d as functional PyTorch ops, for graphs without the custom operator."""
    from ..layers import native, native_torch

    n = input.shape[0]
    c_out, _, kh, kw = weight.shape
    ho, wo = offset.shape[2:]
    xp = nn.functional.pad(input, (1, 1, 1, 1)).permute(0, 2, 3, 1).contiguous()
    geometry = ((kh, kw), tuple(stride), tuple(padding), tuple(dilation), dg)
    # native_torch.im2col without its in-place updates (decompositions must be functional).
    taps = native_torch._taps(xp, offset, mask, *geometry[:5], slice(0, ho * wo))
    flat = native_torch._flat(xp, dg)
    v = sum(flat.gather(1, index) * w for index, w in native_torch._corners(xp, taps, dg))
    if taps.mask is not None:
        v = v * taps.mask.reshape(n, -1, dg, 1)
    cols = native_torch._to_columns(v.view(n, ho * wo, kh * kw, input.shape[1]), groups)
    cols = cols.view(n, ho * wo, groups, -1)
    out = torch.einsum("npgk,gok->ngop", cols, native._weight_rows(weight, groups))
    out = out.reshape(n, c_out, ho, wo)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def export_backbone_onnx(
    model: nn.Module,
    image: torch.Tensor,
    path: str,
    *,
    deform_op: str = "DeformConv",
    opset: int = ONNX_OPSET,
) -> List[str]:
    """Export ``BackboneForExport(model)`` (eval mode) to ONNX, input "image" (1, 3, H, W).

    Args:
        deform_op: "DeformConv" (any H, W multiples of ``size_divisibility``) or "decomposed"
            (gathers and matmuls; ``image``'s size only).

    Returns:
        list[str]: the output names (the FPN levels).
    """
    _check_exportable(model)
    module = BackboneForExport(model).eval()
    names = module.output_names
    if deform_op == "DeformConv":
        axes = {"image": {2: "height", 3: "width"}}
        axes.update({n: {2: f"{n}_height", 3: f"{n}_width"} for n in names})
        _onnx_export_traced(module, (image,), path, ["image"], names, axes, opset)
        return names
    if deform_op != "decomposed":
        raise ValueError(f"deform_op must be 'DeformConv' or 'decomposed', got {deform_op!r}")
    with deform_backend(module, "native", native_impl="torch"), torch.no_grad():
        program = torch.export.export(module, (image,))
        program = program.run_decompositions(
            {torch.ops.dcnv2.deform_conv2d.default: _decompose_deform_conv}
        )
        onnx_program = torch.onnx.export(
            program, (image,), dynamo=True, input_names=["image"], output_names=names
        )
    onnx_program.save(path)
    return names


def detector_instances(model: nn.Module, image: torch.Tensor):
    """One (3, H, W) image through the detector: ``Instances`` in the image's coordinates
    (``GeneralizedRCNN`` masks stay (R, 1, 28, 28))."""
    if hasattr(model, "roi_heads"):
        return model.inference([{"image": image}], do_postprocess=False)[0]
    return model([{"image": image}])[0]["instances"]


def export_detector_onnx(
    model: nn.Module, image: torch.Tensor, path: str, *, opset: int = ONNX_OPSET
) -> Tuple[List[str], object]:
    """Export a detector (``GeneralizedRCNN`` or ``RetinaNet``, eval mode) to ONNX.

    Input "image": (3, H, W) float32 0-255 in ``cfg.INPUT.FORMAT`` order, not resized, H and W
    multiples of ``size_divisibility``. Outputs for R detections: ``pred_boxes`` (R, 4) XYXY,
    ``pred_classes`` (R,) int64, ``scores`` (R,), ``pred_masks`` (R, 1, 28, 28),
    ``image_size`` (2,).

    Returns:
        (output names, adapter): the adapter rebuilds ``Instances`` (:func:`onnx_detections`).
    """
    from detectron2.export import TracingAdapter

    _check_exportable(model)
    adapter = TracingAdapter(model, (image,), detector_instances).eval()
    with torch.no_grad():
        fields = detector_instances(model, image).get_fields()
    names = sorted(fields) + ["image_size"]  # TracingAdapter's order
    axes = {"image": {1: "height", 2: "width"}}
    axes.update({n: {0: "detections"} for n in names if n != "image_size"})
    _onnx_export_traced(adapter, adapter.flattened_inputs, path, ["image"], names, axes, opset)
    return names, adapter


def onnx_detections(session, adapter, image: torch.Tensor):
    """Run an exported detector (onnxruntime session) on one (3, H, W) image; its ``Instances``."""
    outputs = session.run(None, {"image": image.numpy().astype(np.float32)})
    return adapter.outputs_schema([torch.from_numpy(o) for o in outputs])


def onnx_session(path: str):
    """An onnxruntime CPU ``InferenceSession`` of an ONNX file."""
    import onnxruntime

    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])


def run_onnx(path: str, image: np.ndarray) -> List[np.ndarray]:
    """Run an exported backbone in onnxruntime (CPU) on a (1, 3, H, W) float32 image."""
    return onnx_session(path).run(None, {"image": image.astype(np.float32)})


def onnx_operators(path: str) -> Dict[Tuple[str, str], int]:
    """``{(domain, op_type): count}`` of an ONNX file's nodes, subgraphs and functions included."""
    import onnx

    model = onnx.load(path)
    counts: Dict[Tuple[str, str], int] = collections.Counter()

    def visit(nodes: Sequence) -> None:
        for node in nodes:
            counts[node.domain or "", node.op_type] += 1
            for attr in node.attribute:
                visit(attr.g.node)  # the subgraphs of If and Loop; empty for other attributes

    visit(model.graph.node)
    for function in model.functions:
        visit(function.node)
    return counts


def compare_detections(got, expected, score_threshold: float = 0.0) -> Dict[str, float]:
    """Match two ``Instances`` one to one: each expected detection, by decreasing score, takes the
    closest unmatched box of its class in ``got``.

    Returns:
        dict: ``count``, ``count_other``, ``unmatched``, ``max_box_diff`` (pixels),
        ``max_score_diff``, ``box_tolerance`` and ``agree`` (same detections, boxes within it).
        Float32 rounding grows with the coordinates: the tolerance is 2e-4 of the image's longest
        side, at least 1e-2 px.
    """
    got, kept = (inst[inst.scores >= score_threshold] for inst in (got, expected))
    s1, c1, b1 = got.scores, got.pred_classes, got.pred_boxes.tensor
    s0, c0, b0 = kept.scores, kept.pred_classes, kept.pred_boxes.tensor
    free = torch.ones(len(s1), dtype=torch.bool)
    box_diff, score_diff, unmatched = 0.0, 0.0, 0
    for i in s0.argsort(descending=True, stable=True).tolist():
        candidates = (free & (c1 == c0[i])).nonzero().flatten()
        if len(candidates) == 0:
            unmatched += 1
            continue
        diffs = (b1[candidates] - b0[i]).abs().max(dim=1).values
        j = int(candidates[int(diffs.argmin())])
        free[j] = False
        box_diff = max(box_diff, float(diffs.min()))
        score_diff = max(score_diff, float((s1[j] - s0[i]).abs()))
    if unmatched or len(s0) != len(s1):
        box_diff = score_diff = float("inf")
    tolerance = max(1e-2, 2e-4 * max(expected.image_size))
    return {
        "count": len(s0),
        "count_other": len(s1),
        "unmatched": unmatched,
        "max_box_diff": box_diff,
        "max_score_diff": score_diff,
        "box_tolerance": tolerance,
        "agree": box_diff <= tolerance,
    }


def relative_errors(got: Sequence[np.ndarray], expected: Sequence[torch.Tensor]) -> List[float]:
    """max |got - expected| / max |expected| per output."""
    return [
        float(np.abs(g - e.numpy()).max() / max(float(e.abs().max()), 1e-12))
        for g, e in zip(got, expected)
    ]
