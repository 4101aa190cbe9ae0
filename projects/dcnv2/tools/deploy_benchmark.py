"""Inference time of one detector in the deployment runtimes (eager, ``torch.compile``,
onnxruntime; backbone + FPN alone too), in interleaved rounds; medians per image."""

import copy
import time
from typing import Dict, Sequence

import numpy as np
import torch
from torch import nn

from .export_model import deform_backend, export_detector_onnx, onnx_session
from .timing import write_json  # noqa: F401  (tools/export_model.py writes its results with it)
from .timing import InProcessSteps, interleaved_times, summarize, text_table, time_call

RUNTIMES = ("pytorch_eager", "torch_compile", "onnxruntime", "backbone_eager", "backbone_compile")
_BASELINE = {"backbone_eager": "backbone_eager", "backbone_compile": "backbone_eager"}


def _detector_call(model: nn.Module):
    if hasattr(model, "roi_heads"):
        return lambda image: model.inference([{"image": image}], do_postprocess=False)
    return lambda image: model([{"image": image}])


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
        model: the detector (eval mode, on CPU); not modified.
        images: (3, H, W) float images, H and W multiples of the size divisibility.
        warmup: untimed passes first (compilation happens there).

    Returns:
        dict: runtime -> {"times_s", and their :func:`.timing.summarize`}, plus "setup".
    """
    unknown = set(runtimes) - set(RUNTIMES)
    if unknown:
        raise ValueError(f"Unknown runtimes {sorted(unknown)}; expected some of {RUNTIMES}")
    runs = {}
    sizes = [list(x.shape[1:]) for x in images]
    setup = dict(threads=torch.get_num_threads(), images=sizes, repeats=repeats)
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
            runs["backbone_eager"] = lambda x: model.backbone(inputs[id(x)])
        if "backbone_compile" in runtimes:
            backbone = torch.compile(model.backbone, fullgraph=True)
            runs["backbone_compile"] = lambda x: backbone(inputs[id(x)])
        passes = {name: (lambda run=run: [run(x) for x in images]) for name, run in runs.items()}
        with torch.no_grad():
            for name, run_pass in passes.items():
                spent = sum(time_call(run_pass) for _ in range(warmup))
                if name.endswith("compile"):
                    setup[f"{name}_warmup_s"] = spent
            workers = {name: InProcessSteps({"pass": p}) for name, p in passes.items()}
            times = interleaved_times(workers, ("pass",), repeats, warmup=0)
    result: Dict[str, Dict] = {}
    for name in runs:
        per_image = [t / len(images) for t in times[name]["pass"]]
        result[name] = dict(summarize(per_image), times_s=per_image)
    result["setup"] = setup
    return result


def format_table(result: Dict[str, Dict]) -> str:
    """A text table per runtime: median and min seconds per image, speed-up over eager."""
    rows = []
    for name in (n for n in RUNTIMES if n in result):
        r = result[name]
        base = result.get(_BASELINE.get(name, "pytorch_eager"), {}).get("median_s")
        ratio = f"{base / r['median_s']:.2f}x" if base else "-"
        rows.append([name, f"{r['median_s']:.4f}", f"{r['iqr_s']:.4f}", f"{r['min_s']:.4f}", ratio])
    header = ["runtime", "median s/img", "IQR s/img", "min s/img", "speed-up"]
    return text_table(header, rows, markdown=False)
