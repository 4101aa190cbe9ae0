"""Export dcnv2 models: TorchScript of the whole detector, ONNX of the backbone + FPN.

* TorchScript: detectron2's ``TracingAdapter`` flattens the detector's ``list[dict]`` inputs and
  ``Instances`` outputs so ``torch.jit.trace`` can record it. The deformable convs are traced
  with the "torchvision" backend, whose op (``torchvision::deform_conv2d``) is registered with
  TorchScript and saved in the file; the "native" backend is a Python ``autograd.Function``,
  which TorchScript cannot save. Loading the file needs ``import torchvision``. The trace is
  specialised to the traced image size's control flow, as every traced detectron2 model is.
* ONNX: the backbone + FPN (image tensor in, one tensor per FPN level out) exported with
  ``torch.onnx.export(dynamo=True)`` through the "native" backend's PyTorch-op implementation,
  so the graph has standard ONNX operators only (Gather/Where/MatMul...); fixed input size.
"""

import contextlib
import os
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..layers import DeformConv, ModulatedDeformConv

__all__ = [
    "deform_backend",
    "trace_detector",
    "detector_outputs",
    "BackboneForExport",
    "export_backbone_onnx",
    "run_onnx",
    "onnx_operators",
]


@contextlib.contextmanager
def deform_backend(model: nn.Module, backend: str, native_impl: str = "") -> Iterator[None]:
    """Temporarily run every deformable conv of ``model`` with ``backend`` (and, for "native",
    the implementation ``native_impl``: "torch" or "cpp"), restoring them afterwards."""
    convs = [m for m in model.modules() if isinstance(m, (DeformConv, ModulatedDeformConv))]
    saved = [m.backend for m in convs]
    saved_env = os.environ.get("DCNV2_NATIVE_IMPL")
    try:
        for m in convs:
            m.backend = backend
        if native_impl:
            os.environ["DCNV2_NATIVE_IMPL"] = native_impl
        yield
    finally:
        for m, b in zip(convs, saved):
            m.backend = b
        if native_impl:
            if saved_env is None:
                os.environ.pop("DCNV2_NATIVE_IMPL", None)
            else:
                os.environ["DCNV2_NATIVE_IMPL"] = saved_env


def trace_detector(model: nn.Module, inputs: List[Dict]) -> Tuple[torch.jit.ScriptModule, object]:
    """Trace a detectron2 meta-architecture (eval mode) into TorchScript.

    Args:
        model: e.g. ``GeneralizedRCNN`` in eval mode.
        inputs: one batch as the model takes it, ``[{"image": (3, H, W) tensor}]``.

    Returns:
        (traced, adapter): the TorchScript module (takes the flattened image tensors) and the
        ``TracingAdapter``, whose ``outputs_schema`` turns the traced outputs back into
        ``Instances`` (see :func:`detector_outputs`).
    """
    from detectron2.export import TracingAdapter

    with deform_backend(model, "torchvision"):
        adapter = TracingAdapter(model, [{"image": x["image"]} for x in inputs])
        adapter.eval()
        with torch.no_grad():
            traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    return traced, adapter


def detector_outputs(traced: torch.jit.ScriptModule, adapter, inputs: List[Dict]) -> List:
    """Run a traced detector and rebuild the eager model's outputs (``[{"instances": ...}]``
    for ``GeneralizedRCNN``), for images of the traced size."""
    from detectron2.export.flatten import flatten_to_tuple

    flat, _ = flatten_to_tuple([{"image": x["image"]} for x in inputs])
    with torch.no_grad():
        return adapter.outputs_schema(traced(*flat))


class BackboneForExport(nn.Module):
    """A detector's backbone (+ FPN) as a tensor-to-tuple module: normalises the image as the
    detector does and returns the features in ``output_names`` order.

    ``forward(image)``: image (N, 3, H, W) float, 0-255, in ``cfg.INPUT.FORMAT`` channel order;
    H and W multiples of the backbone's ``size_divisibility``. Returns a tuple of
    (N, C, H / stride, W / stride) tensors.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = model.backbone
        self.register_buffer("pixel_mean", model.pixel_mean.clone(), persistent=False)
        self.register_buffer("pixel_std", model.pixel_std.clone(), persistent=False)
        self.output_names = list(self.backbone.output_shape())

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        features = self.backbone((image - self.pixel_mean) / self.pixel_std)
        return tuple(features[name] for name in self.output_names)


def export_backbone_onnx(model: nn.Module, image: torch.Tensor, path: str) -> List[str]:
    """Export ``BackboneForExport(model)`` to ONNX at ``image``'s size.

    Args:
        model: a detector with ``backbone``, ``pixel_mean``, ``pixel_std`` (eval mode).
        image: (1, 3, H, W) example input.
        path: the .onnx file to write.

    Returns:
        list[str]: output names (the FPN levels, e.g. p2..p6).
    """
    module = BackboneForExport(model).eval()
    with deform_backend(module, "native", native_impl="torch"), torch.no_grad():
        program = torch.onnx.export(
            module,
            (image,),
            dynamo=True,
            input_names=["image"],
            output_names=module.output_names,
            verbose=False,
        )
    program.save(path)
    return module.output_names


def run_onnx(path: str, image: np.ndarray) -> List[np.ndarray]:
    """Run an exported backbone in onnxruntime (CPU) on a (1, 3, H, W) float32 image."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: image.astype(np.float32)})


def onnx_operators(path: str) -> Dict[Tuple[str, str], int]:
    """``{(domain, op_type): count}`` of the nodes of an ONNX file, subgraphs and local
    functions included ("" is the standard domain)."""
    import onnx

    model = onnx.load(path)
    counts: Dict[Tuple[str, str], int] = {}

    def visit(nodes: Sequence) -> None:
        for node in nodes:
            key = (node.domain or "", node.op_type)
            counts[key] = counts.get(key, 0) + 1
            for attr in node.attribute:
                if attr.g is not None and len(attr.g.node):
                    visit(attr.g.node)

    visit(model.graph.node)
    for function in model.functions:
        visit(function.node)
    return counts
