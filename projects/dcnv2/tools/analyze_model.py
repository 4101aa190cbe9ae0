"""FLOPs, activations and parameters of dcnv2 models with fvcore, deformable convs included.

One multiply-add is one flop: ``N*C_out*(C_in/groups)*kh*kw*Ho*Wo`` for the conv plus
``(4 + modulated)*N*C_in*kh*kw*Ho*Wo`` for sampling and modulation (bias not counted).
"""

from collections import Counter
from typing import Any, Dict, List, Sequence, Tuple

import torch
from detectron2.export import TracingAdapter
from detectron2.utils.analysis import FlopCountAnalysis
from fvcore.nn import ActivationCountAnalysis, flop_count_table, parameter_count_table
from fvcore.nn.jit_handles import get_shape
from torch import nn

TASKS = ("flop", "activation", "parameter", "structure")


def deform_conv_flops(
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    output_shape: Sequence[int],
    modulated: bool,
) -> int:
    """Multiply-adds of one deformable conv (formula in the module docstring)."""
    n, c_in = input_shape[:2]
    c_out, c_per_group, kh, kw = weight_shape
    ho, wo = output_shape[2:]
    dense = n * c_out * c_per_group * kh * kw * ho * wo
    sampled = n * c_in * kh * kw * ho * wo
    return int(dense + (4 + int(modulated)) * sampled)


def _torchvision_shapes(inputs: List[Any], outputs: List[Any]) -> Tuple:
    # torchvision::deform_conv2d(input, weight, offset, mask, bias, stride_h, stride_w, pad_h,
    # pad_w, dilation_h, dilation_w, groups, offset_groups, use_mask)
    x, weight = inputs[0], inputs[1]
    return get_shape(x), get_shape(weight), get_shape(outputs[0]), bool(inputs[-1].toIValue())


def _op_shapes(inputs: List[Any], outputs: List[Any]) -> Tuple:
    # dcnv2::deform_conv2d(input, offset, mask, weight, bias, ...); a missing mask is a None.
    x, mask, weight = inputs[0], inputs[2], inputs[3]
    return get_shape(x), get_shape(weight), get_shape(outputs[0]), get_shape(mask) is not None


# op name as fvcore sees it -> function giving (input shape, weight shape, output shape, masked)
DEFORM_CONV_OPS = {
    "torchvision::deform_conv2d": _torchvision_shapes,
    "dcnv2::deform_conv2d": _op_shapes,
}


def _flop_handle(shapes_fn):
    def handle(inputs, outputs):
        return Counter({"deform_conv": deform_conv_flops(*shapes_fn(inputs, outputs))})

    return handle


def _no_count(inputs, outputs) -> Counter:
    return Counter()


def _activation_handle(inputs, outputs) -> Counter:
    return Counter({"deform_conv": int(torch.Size(get_shape(outputs[0])).numel())})


def flop_count_analysis(model: nn.Module, inputs: Any) -> FlopCountAnalysis:
    """detectron2's ``FlopCountAnalysis`` (inputs of any structure, elementwise ops ignored),
    deformable convs counted."""
    analysis = FlopCountAnalysis(model, inputs)
    handles = {op: _flop_handle(fn) for op, fn in DEFORM_CONV_OPS.items()}
    # Ignoring an op does not drop fvcore's own handle: batch norm, which detectron2 ignores.
    return analysis.set_op_handle("aten::batch_norm", _no_count, **handles)


def activation_count_analysis(model: nn.Module, inputs: Any) -> ActivationCountAnalysis:
    """fvcore's ``ActivationCountAnalysis`` on inputs of any structure, deformable convs counted
    like convs."""
    wrapper = TracingAdapter(model, inputs, allow_non_tensor=True)
    analysis = ActivationCountAnalysis(wrapper, wrapper.flattened_inputs)
    return analysis.set_op_handle(**{op: _activation_handle for op in DEFORM_CONV_OPS})


def model_inputs(height: int, width: int, seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    """``[{"image": (3, H, W)}]``, fixed so that the heads' proposal count is reproducible."""
    generator = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, height, width), generator=generator).float()}]


def analyze_model(
    model: nn.Module, inputs: Any, tasks: Sequence[str] = TASKS, max_depth: int = 4
) -> Dict[str, Any]:
    """Tables and totals for ``tasks`` (of :data:`TASKS`) of a model in eval mode.

    Returns:
        dict: per task ``{"table", "total"}``; "flop" and "activation" also ``by_operator``,
        "flop" the ``unsupported`` ops (not counted) with how often they ran.
    """
    report: Dict[str, Any] = {}
    if "flop" in tasks or "activation" in tasks:
        flops = flop_count_analysis(model, inputs)
        acts = activation_count_analysis(model, inputs)
        for analysis in (flops, acts):
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        table = flop_count_table(flops, max_depth=max_depth, activations=acts)
        for task, analysis in (("flop", flops), ("activation", acts)):
            if task in tasks:
                by_operator = {k: int(v) for k, v in sorted(analysis.by_operator().items())}
                report[task] = {
                    "table": table,
                    "total": int(analysis.total()),
                    "by_operator": by_operator,
                }
        if "flop" in tasks:
            report["flop"]["unsupported"] = dict(sorted(flops.unsupported_ops().items()))
    if "parameter" in tasks:
        total = sum(p.numel() for p in model.parameters())
        report["parameter"] = {"table": parameter_count_table(model, max_depth), "total": total}
    if "structure" in tasks:
        report["structure"] = {"table": str(model)}
    return report
