"""FLOPs, activations and parameters of dcnv2 models with fvcore, deformable convs included.

fvcore counts operators it has a handle for and skips the rest with an "unsupported operator"
warning, so out of the box a deformable conv counts as nothing. This module registers handles
for the ops a deformable conv traces to:

* ``torchvision::deform_conv2d`` (the "torchvision" backend);
* ``prim::PythonOp._DeformConv2d`` (the "native" backend's ``torch.autograd.Function``).

Convention (fvcore's): one fused multiply-add is one flop. For a deformable conv with input
(N, C_in, H, W), weight (C_out, C_in/groups, kh, kw) and output (N, C_out, Ho, Wo)::

    dense      = N * C_out * (C_in / groups) * kh * kw * Ho * Wo   # the conv itself
    sampled    = N * C_in * kh * kw * Ho * Wo                      # values gathered
    flops      = dense + 4 * sampled        # bilinear interpolation: 4 MACs per value
                       + 1 * sampled        # modulation (DCNv2 only): 1 multiply per value

The bilinear weights themselves (a few operations per tap and position, shared by the channels
of a deformable group) and the bias are left out, as fvcore leaves out a conv's bias. The
offset/mask predictor (``conv2_offset``) is a plain conv and is counted by fvcore as such.
The modulated deformable RoI pooling (``dcnv2.layers.mdpool``) is made of standard PyTorch
operators and is counted through them: its bilinear sampling as ``aten::grid_sampler`` (fvcore:
4 per sampled value), its offset/mask predictor as ``linear``; the averaging of the samples
(``aten::sum``) is not counted, like other reductions.
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

# detectron2's list (detectron2.utils.analysis): elementwise, reduction and bookkeeping ops that
# are not worth counting (batch norm folds into the conv at inference). Kept in sync by hand
# because detectron2 keeps it private.
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
    """Flops (multiply-adds) of one deformable conv, by the formula in the module docstring.

    Args:
        input_shape: (N, C_in, H, W).
        weight_shape: (C_out, C_in / groups, kh, kw).
        output_shape: (N, C_out, Ho, Wo).
        modulated: True for DCNv2 (a mask), False for DCNv1.
    """
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


def _native_shapes(inputs: List[Any], outputs: List[Any]) -> Tuple:
    # native _DeformConv2d.apply(input, offset, mask, weight, bias, ...): only the arguments
    # that are tensors become node inputs, so a missing mask or bias shifts the rest. The
    # 4-D tensors after the offset are (mask,) weight; a bias is 1-D.
    shapes = [get_shape(v) for v in inputs]
    four_d = [s for s in shapes[2:] if s is not None and len(s) == 4]
    return shapes[0], four_d[-1], get_shape(outputs[0]), len(four_d) == 2


# op name as fvcore sees it -> function giving (input shape, weight shape, output shape, masked)
DEFORM_CONV_OPS = {
    "torchvision::deform_conv2d": _torchvision_shapes,
    "prim::PythonOp._DeformConv2d": _native_shapes,
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
    """A detectron2 meta-architecture taking ``list[dict]`` is wrapped in ``TracingAdapter``;
    a module taking tensors is used as it is."""
    if isinstance(inputs, list):
        wrapper = TracingAdapter(model, inputs, allow_non_tensor=True)
        return wrapper, wrapper.flattened_inputs
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    return model, tuple(inputs)


def flop_count_analysis(model: nn.Module, inputs: ModelInputs) -> FlopCountAnalysis:
    """fvcore's ``FlopCountAnalysis`` that counts deformable convs and ignores what detectron2
    ignores (elementwise ops, NMS, ...).

    Args:
        model: a detectron2 meta-architecture (with ``inputs`` as ``list[dict]``) or any module
            taking tensors (with ``inputs`` a tensor or a tuple of tensors). Put it in eval
            mode first for inference counts.
        inputs: what the model is called with.

    Returns:
        FlopCountAnalysis: ``.total()``, ``.by_module()``, ``.by_operator()``,
        ``.unsupported_ops()``; module names of a wrapped detector start with ``model.``.
    """
    traceable, args = _traceable(model, inputs)
    analysis = FlopCountAnalysis(traceable, args)
    _ignore(analysis)
    analysis.set_op_handle(**{op: _flop_handle(fn) for op, fn in DEFORM_CONV_OPS.items()})
    return analysis


def activation_count_analysis(model: nn.Module, inputs: ModelInputs) -> ActivationCountAnalysis:
    """fvcore's ``ActivationCountAnalysis`` (output elements of convs and matmuls) with the
    deformable convs counted like convs. Arguments as :func:`flop_count_analysis`."""
    traceable, args = _traceable(model, inputs)
    analysis = ActivationCountAnalysis(traceable, args)
    _ignore(analysis)
    analysis.set_op_handle(**{op: _activation_handle for op in DEFORM_CONV_OPS})
    return analysis


def model_inputs(height: int, width: int, seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    """One fixed random image as detectron2 models take it: ``[{"image": (3, H, W) float}]``.

    Flops of the backbone depend only on the size; those of the heads on the number of
    proposals/detections, which this fixed image keeps reproducible.
    """
    if height < 32 or width < 32:
        raise ValueError(f"the input must be at least 32x32, got {height}x{width}")
    generator = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), generator=generator).float()
    return [{"image": image}]


def unsupported_ops(analysis) -> Dict[str, int]:
    """Ops the analysis ran into but could not count (counted as 0), with how often they ran.

    ``prim::CallFunction`` is a call into a scripted function (detectron2 scripts a few box
    helpers); the others are real operators without a handle (``torchvision::roi_align``...).
    """
    return dict(sorted(analysis.unsupported_ops().items()))


TASKS = ("flop", "activation", "parameter", "structure")


def analyze_model(
    model: nn.Module, inputs: ModelInputs, tasks: Sequence[str] = TASKS, max_depth: int = 4
) -> Dict[str, Any]:
    """Tables and totals for ``tasks``.

    Args:
        model: a detectron2 meta-architecture in eval mode (or any module, see
            :func:`flop_count_analysis`).
        inputs: what the model is called with, e.g. :func:`model_inputs`.
        tasks: any of "flop", "activation", "parameter", "structure".
        max_depth: depth of the per-module tables.

    Returns:
        dict: per task, ``{"table": str, "total": int, ...}`` ("structure" has only a table;
        "flop" and "activation" share one table with both columns); "flop" and "activation"
        also have ``by_operator``, and "flop" ``unsupported`` (ops counted as 0).
    """
    from fvcore.nn import flop_count_table, parameter_count, parameter_count_table

    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; expected some of {list(TASKS)}")
    report: Dict[str, Any] = {}
    if "flop" in tasks or "activation" in tasks:
        # One per-module table with both columns (fvcore formats them together).
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
