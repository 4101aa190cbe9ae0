"""Inference time of one detector in the deployment runtimes, side by side: PyTorch eager (native
backend), PyTorch with ``torch.compile`` of the backbone (inductor), and onnxruntime running the
exported detector (:func:`dcnv2.tools.export_model.export_detector_onnx`); and of the backbone + FPN
alone, eager and compiled (``fullgraph=True``), on the normalised, padded image.

The runtimes take turns on every repeat (eager, compiled, onnxruntime, eager, ...), so a busy
machine slows all of them alike; the median over repeats is reported.
"""

import copy
import json
import statistics
import time
from typing import Dict, List, Sequence

import numpy as np
import torch
from torch import nn

from .export_model import deform_backend, export_detector_onnx, onnx_session

__all__ = ["RUNTIMES", "benchmark_runtimes", "format_table", "write_json"]

RUNTIMES = ("pytorch_eager", "torch_compile", "onnxruntime", "backbone_eager", "backbone_compile")
# Row to compare each runtime with in the table.
_BASELINE = {"backbone_eager": "backbone_eager", "backbone_compile": "backbone_eager"}


def _detector_call(model: nn.Module):
    def run(image: torch.Tensor):
        with torch.no_grad():
            if hasattr(model, "roi_heads"):
                return model.inference([{"image": image}], do_postprocess=False)
            return model([{"image": image}])

    return run


def _backbone_call(backbone: nn.Module, inputs: Dict[int, torch.Tensor]):
    def run(image: torch.Tensor):
        with torch.no_grad():
            return backbone(inputs[id(image)])

    return run


def benchmark_runtimes(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    onnx_path: str,
    *,
    repeats: int = 3,
    warmup: int = 1,
    runtimes: Sequence[str] = RUNTIMES,
) -> Dict[str, Dict]:
    """Seconds per image of each runtime on ``images``.

    Args:
        model: the detector (eval mode, on CPU); it is not modified (the compiled runtime
            compiles the backbone of a copy).
        images: (3, H, W) float images, H and W multiples of the size divisibility.
        onnx_path: where to write the exported detector (exported from ``images[0]``).
        repeats: timed passes over ``images`` per runtime.
        warmup: untimed passes first (compilation happens there, for every image size).
        runtimes: a subset of :data:`RUNTIMES`.

    Returns:
        dict: runtime -> {"median_s", "min_s", "times_s": [seconds per image, per repeat]},
        plus "setup" -> {"threads", "images": [[H, W], ...], "repeats", "export_s",
        "<runtime>_warmup_s"}.
    """
    unknown = set(runtimes) - set(RUNTIMES)
    if unknown:
        raise ValueError(f"Unknown runtimes {sorted(unknown)}; expected some of {RUNTIMES}")
    runs = {}
    setup: Dict = {
        "threads": torch.get_num_threads(),
        "images": [list(x.shape[1:]) for x in images],
        "repeats": repeats,
    }
    with deform_backend(model, "native"):
        if "pytorch_eager" in runtimes:
            runs["pytorch_eager"] = _detector_call(model)
        if "torch_compile" in runtimes:
            compiled = copy.deepcopy(model)
            compiled.backbone.compile()
            runs["torch_compile"] = _detector_call(compiled)
        if "onnxruntime" in runtimes:
            start = time.perf_counter()
            export_detector_onnx(model, images[0], onnx_path)
            setup["export_s"] = time.perf_counter() - start
            session = onnx_session(onnx_path)
            arrays = {id(x): x.numpy().astype(np.float32) for x in images}
            runs["onnxruntime"] = lambda x: session.run(None, {"image": arrays[id(x)]})
        inputs = {id(x): model.preprocess_image([{"image": x}]).tensor for x in images}
        if "backbone_eager" in runtimes:
            runs["backbone_eager"] = _backbone_call(model.backbone, inputs)
        if "backbone_compile" in runtimes:
            backbone = torch.compile(model.backbone, fullgraph=True)
            runs["backbone_compile"] = _backbone_call(backbone, inputs)
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(warmup):
                for x in images:
                    run(x)
            if name.endswith("compile"):
                setup[f"{name}_warmup_s"] = time.perf_counter() - start
        times: Dict[str, List[float]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                for x in images:
                    run(x)
                times[name].append((time.perf_counter() - start) / len(images))
    result: Dict[str, Dict] = {
        name: {"median_s": statistics.median(t), "min_s": min(t), "times_s": t}
        for name, t in times.items()
    }
    result["setup"] = setup
    return result


def format_table(result: Dict[str, Dict]) -> str:
    """A text table: one row per runtime, median and min seconds per image, and the speed-up
    over eager PyTorch (the detector's, or the backbone's for the backbone rows)."""
    lines = [f"{'runtime':<16} {'median s/img':>13} {'min s/img':>10} {'speed-up':>9}"]
    for name in RUNTIMES:
        if name not in result:
            continue
        r = result[name]
        base = result.get(_BASELINE.get(name, "pytorch_eager"), {}).get("median_s")
        ratio = f"{base / r['median_s']:.2f}x" if base else "-"
        lines.append(f"{name:<16} {r['median_s']:>13.4f} {r['min_s']:>10.4f} {ratio:>9}")
    return "\n".join(lines)


def write_json(result: Dict[str, Dict], path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
