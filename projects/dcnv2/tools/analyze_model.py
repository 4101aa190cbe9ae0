"""FLOPs, activations and parameters of dcnv2 models with fvcore, deformable convs included.

One multiply-add is one flop: ``N*C_out*(C_in/groups)*kh*kw*Ho*Wo`` for the conv plus
``(4 + modulated)*N*C_in*kh*kw*Ho*Wo`` for sampling and modulation (bias not counted).
"""

from collections import Counter
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
from detectron2.export import TracingAdapter
from fvcore.nn import ActivationCountAnalysis, FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn

__all__ = [
    "DEFORM_CONV_OPS",
    "deform_conv_flops",
    "flop_count_analysis",
    "activation_count_analysis",
    "model_inputs",
    "unsupported_ops",
    "analyze_model",
    "TASKS",
]

# detectron2's private list (detectron2.utils.analysis), copied: ops not worth counting.
_IGNORED_OPS = (
    "aten::add",
    "aten::add_",
    "aten::argmax",
    "aten::argsort",
    "aten::batch_norm",
    "aten::constant_pad_nd",
    "aten::div",
    "aten::div_",
    "aten::exp",
    "aten::log2",
    "aten::max_pool2d",
    "aten::meshgrid",
    "aten::mul",
    "aten::mul_",
    "aten::neg",
    "aten::nonzero_numpy",
    "aten::reciprocal",
    "aten::repeat_interleave",
    "aten::rsub",
    "aten::sigmoid",
    "aten::sigmoid_",
    "aten::softmax",
    "aten::sort",
    "aten::sqrt",
    "aten::sub",
    "torchvision::nms",
)


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


def _no_count(inputs, outputs) -> Counter:
    return Counter()


def _ignore(analysis) -> None:
    # set_op_handle(op=None) does not override fvcore's default handles (aten::batch_norm has
    # one), so ignored ops get a handle that counts nothing instead.
    analysis.set_op_handle(**{op: _no_count for op in _IGNORED_OPS})


def _flop_handle(shapes_fn):
    def handle(inputs, outputs):
        return Counter({"deform_conv": deform_conv_flops(*shapes_fn(inputs, outputs))})

    return handle


def _activation_handle(inputs, outputs):
    return Counter({"deform_conv": int(torch.Size(get_shape(outputs[0])).numel())})


ModelInputs = Union[torch.Tensor, Tuple[torch.Tensor, ...], List[Dict[str, Any]]]


def _traceable(model: nn.Module, inputs: ModelInputs) -> Tuple[nn.Module, Tuple]:
    if isinstance(inputs, list):
        wrapper = TracingAdapter(model, inputs, allow_non_tensor=True)
        return wrapper, wrapper.flattened_inputs
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    return model, tuple(inputs)


def flop_count_analysis(model: nn.Module, inputs: ModelInputs) -> FlopCountAnalysis:
    """fvcore's ``FlopCountAnalysis`` counting deformable convs, ignoring what detectron2 ignores.

    Args:
        model: a meta-architecture (``inputs`` a ``list[dict]``) or a module taking tensors.
    """
    traceable, args = _traceable(model, inputs)
    analysis = FlopCountAnalysis(traceable, args)
    _ignore(analysis)
    analysis.set_op_handle(**{op: _flop_handle(fn) for op, fn in DEFORM_CONV_OPS.items()})
    return analysis


def activation_count_analysis(model: nn.Module, inputs: ModelInputs) -> ActivationCountAnalysis:
    """fvcore's ``ActivationCountAnalysis`` with deformable convs counted like convs."""
    traceable, args = _traceable(model, inputs)
    analysis = ActivationCountAnalysis(traceable, args)
    _ignore(analysis)
    analysis.set_op_handle(**{op: _activation_handle for op in DEFORM_CONV_OPS})
    return analysis


def model_inputs(height: int, width: int, seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    """``[{"image": (3, H, W)}]``, fixed so that the heads' proposal count is reproducible."""
    if height < 32 or width < 32:
        raise ValueError(f"the input must be at least 32x32, got {height}x{width}")
    generator = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), generator=generator).float()
    return [{"image": image}]


def unsupported_ops(analysis) -> Dict[str, int]:
    """Ops the analysis could not count (as 0), with how often they ran."""
    return dict(sorted(analysis.unsupported_ops().items()))


TASKS = ("flop", "activation", "parameter", "structure")


def analyze_model(
    model: nn.Module, inputs: ModelInputs, tasks: Sequence[str] = TASKS, max_depth: int = 4
) -> Dict[str, Any]:
    """Tables and totals for ``tasks`` (of :data:`TASKS`) of a model in eval mode.

    Returns:
        dict: per task ``{"table", "total"}``; "flop" and "activation" also ``by_operator``.
    """
    from fvcore.nn import flop_count_table, parameter_count, parameter_count_table

    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; expected some of {list(TASKS)}")
    report: Dict[str, Any] = {}
    if "flop" in tasks or "activation" in tasks:
        flops = flop_count_analysis(model, inputs)
        acts = activation_count_analysis(model, inputs)
        for analysis in (flops, acts):
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        table = flop_count_table(flops, max_depth=max_depth, activations=acts)
        if "flop" in tasks:
            report["flop"] = {
                "table": table,
                "total": int(flops.total()),
                "by_operator": {k: int(v) for k, v in sorted(flops.by_operator().items())},
                "unsupported": unsupported_ops(flops),
            }
        if "activation" in tasks:
            report["activation"] = {
                "table": table,
                "total": int(acts.total()),
                "by_operator": {k: int(v) for k, v in sorted(acts.by_operator().items())},
            }
    if "parameter" in tasks:
        report["parameter"] = {
            "table": parameter_count_table(model, max_depth=max_depth),
            "total": int(parameter_count(model)[""]),
        }
    if "structure" in tasks:
        report["structure"] = {"table": str(model)}
    return report
