"""Speed and memory of the deformable-conv backends against dense ``conv2d`` on CPU
(``tools/benchmark_ops.py``). Each (shape, method) runs in one worker process for its times
(interleaved rounds) and one for its peak memory; onnxruntime's ``DeformConv`` when installed.
"""

import contextlib
import math
import statistics
from importlib.util import find_spec
from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from ..layers import available_backends, modulated_deform_conv, native
from .timing import (
    PeakMemory,
    StepWorker,
    forward_steps,
    interleaved_times,
    run_in_fresh_process,
    serve_steps,
    text_table,
    worker_main,
)

ONNXRUNTIME = "onnxruntime"
# The references of the ratios (``forward_vs_conv2d``, ...).
_REFERENCES = ("conv2d", "torchvision", ONNXRUNTIME)
# Ratio columns of the table: key -> label; "fwd / ort" only where onnxruntime ran.
_RATIO_COLUMNS = {
    "forward_vs_conv2d": "fwd / conv2d",
    "forward_backward_vs_conv2d": "fwd+bwd / conv2d",
    "forward_vs_torchvision": "fwd / tv",
    "forward_vs_onnxruntime": "fwd / ort",
    "forward_backward_vs_torchvision": "fwd+bwd / tv",
    "peak_vs_torchvision": "peak / tv",
}

# Freed blocks of 64 KiB and more leave the resident set at once, so the peak is the run's own.
_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

STEPS = ("forward", "forward_backward")

# ResNet-50 3x3 convs of an 800x1216 input, batch 2: name -> (N, C, H, W); C_out = C.
SHAPES = {"res3": (2, 128, 100, 152), "res4": (2, 256, 50, 76), "res5": (2, 512, 25, 38)}


def parse_shape(text: str) -> Tuple[str, Tuple[int, int, int, int]]:
    """``"res4"`` (a name of :data:`SHAPES`) or ``"NAME=N,C,H,W"`` -> (name, size)."""
    if text in SHAPES:
        return text, SHAPES[text]
    name, sep, size = text.partition("=")
    try:
        dims = tuple(int(v) for v in size.split(","))
    except ValueError:
        dims = ()
    if not sep or not name or len(dims) != 4 or min(dims) < 1:
        raise ValueError(
            f"shape {text!r}: expected one of {sorted(SHAPES)} or NAME=N,C,H,W (positive ints)"
        )
    return name, dims


def op_inputs(size: Sequence[int]):
    """Fixed random (x, weight, offset, mask): (N, C, H, W), (C, C, 3, 3), (N, 18, H, W),
    (N, 9, H, W); offsets of about two pixels."""
    n, c, h, w = size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(c, c, 3, 3, generator=g) * 0.01
    offset = torch.randn(n, 18, h, w, generator=g) * 2
    mask = torch.rand(n, 9, h, w, generator=g)
    return x, weight, offset, mask


def op_steps(method: str, leaves, precision=None):
    """Forward (no grad) and forward+backward of ``method`` (3x3, padding 1) on ``leaves``, as
    functions without arguments; under autocast to ``precision`` when given."""
    x, weight, offset, mask = leaves
    half = precision not in (None, torch.float32)
    autocast = torch.autocast(x.device.type, precision or torch.float32, enabled=half)

    def forward():
        with autocast:
            if method == "conv2d":
                return torch.nn.functional.conv2d(x, weight, padding=1)
            return modulated_deform_conv(x, offset, mask, weight, padding=1, backend=method)

    return forward_steps(forward, leaves)


def measure(spec: Mapping) -> Dict:
    """One case in this process (``spec``: ``size``, ``method``, ``threads``, ``part``): "memory"
    returns the peak memory (MiB); "time" serves timed runs of :data:`STEPS` to a
    :class:`.timing.StepWorker`, then returns the native backend's chosen ``ways`` (for
    onnxruntime, its errors against native's)."""
    torch.set_num_threads(spec["threads"])
    method, size = spec["method"], spec["size"]
    if method == ONNXRUNTIME:
        session = onnxruntime_session(size, spec["threads"])
        feeds = _feeds(op_inputs(size))
        session.run(None, feeds)  # one-time costs, as the other methods' first forward+backward
        serve_steps({"forward": lambda: session.run(None, feeds)})
        return compare_onnxruntime(size, session=session)  # after the timed runs
    leaves = [t.requires_grad_() for t in op_inputs(size)]
    no_grad_forward, forward_backward = op_steps(method, leaves)
    forward_backward()  # one-time costs (see the module docstring)
    if spec.get("part") == "memory":
        with PeakMemory() as memory:
            forward_backward()
        return {"peak_mib": memory.growth_mib}
    serve_steps({"forward": no_grad_forward, "forward_backward": forward_backward})
    return {"ways": native.chosen_ways()} if method == "native" else {}


def onnxruntime_session(size: Sequence[int], threads: int):
    """An onnxruntime CPU session of one ONNX ``DeformConv`` node (opset 19, 3x3, padding 1, mask,
    no bias) with inputs ``X``, ``W``, ``offset``, ``mask`` as :func:`op_inputs`, output ``Y``."""
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    from .export_model import ONNX_OPSET

    n, c, h, w = size
    shapes = {"X": [n, c, h, w], "W": [c, c, 3, 3], "offset": [n, 18, h, w], "mask": [n, 9, h, w]}
    # DeformConv's optional inputs are positional (X, W, offset, B, mask): "" omits the bias.
    node = helper.make_node("DeformConv", ["X", "W", "offset", "", "mask"], ["Y"], pads=[1] * 4)
    graph = helper.make_graph(
        [node],
        "deform_conv",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in shapes.items()],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n, c, h, w])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    onnx.checker.check_model(model)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def compare_onnxruntime(size: Sequence[int], threads: int = 1, session=None) -> Dict[str, float]:
    """``max_abs_err`` and ``max_rel_err`` (relative to the largest native output) of onnxruntime's
    ``DeformConv`` (``session``, else a new one) against the native backend's forward."""
    session = session or onnxruntime_session(size, threads)
    x, weight, offset, mask = inputs = op_inputs(size)
    ours = modulated_deform_conv(x, offset, mask, weight, padding=1, backend="native")
    theirs = torch.from_numpy(session.run(None, _feeds(inputs))[0])
    err = (theirs - ours).abs().max().item()
    return {"max_abs_err": err, "max_rel_err": err / max(ours.abs().max().item(), 1e-30)}


def _feeds(inputs) -> Dict:
    return dict(zip(("X", "W", "offset", "mask"), (t.numpy() for t in inputs)))


def _onnxruntime_available() -> bool:
    return all(find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def _methods() -> List[str]:
    extra = [ONNXRUNTIME] if _onnxruntime_available() else []
    return ["conv2d"] + available_backends("cpu") + extra


def run(shapes: Mapping[str, Sequence[int]], repeats: int = 3, threads: int = 2) -> List[Dict]:
    """Benchmark conv2d, every CPU backend and onnxruntime (when installed) on ``shapes``
    (name -> (N, C, H, W)).

    Returns:
        list[dict]: per (shape, method): median ``forward_s`` and ``forward_backward_s`` (None
        without a backward), ``peak_mib``, :func:`measure`'s result and the ratios to the
        references of :data:`_REFERENCES` (``*_vs_conv2d``, ...).
    """
    rows = []
    for shape, size in shapes.items():
        specs = {m: dict(size=list(size), method=m, threads=threads) for m in _methods()}
        with contextlib.ExitStack() as stack:
            workers = {
                m: stack.enter_context(
                    StepWorker(__name__, dict(spec, part="time"), f"{shape} with {m}")
                )
                for m, spec in specs.items()
            }
            times = interleaved_times(workers, STEPS, repeats)
            results = {m: worker.finish() for m, worker in workers.items()}
        for method, r in results.items():
            for step in STEPS:
                series = times[method].get(step)
                r[f"{step}_s"] = statistics.median(series) if series else None
            r["peak_mib"] = None
            if method != ONNXRUNTIME:
                memory_spec, what = dict(specs[method], part="memory"), f"{shape} with {method}"
                r.update(run_in_fresh_process(__name__, memory_spec, what, env=_MEMORY_ENV))
        for method, r in results.items():
            r.update(shape=shape, method=method, size=list(size))
            for key in ("forward_s", "forward_backward_s", "peak_mib"):
                for ref in (ref for ref in _REFERENCES if ref in results):
                    value, reference = r[key], results[ref][key]
                    ratio = None if value is None or not reference else value / reference
                    r[f"{key.rsplit('_', 1)[0]}_vs_{ref}"] = ratio
            rows.append(r)
    return rows


def _cell(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(rows: Sequence[Dict]) -> str:
    """Markdown table; ratios are time (or memory) over the reference's."""
    onnx = any("forward_vs_onnxruntime" in r for r in rows)
    ratios = [k for k in _RATIO_COLUMNS if onnx or k != "forward_vs_onnxruntime"]
    header = ["shape", "method", "fwd (s)", "fwd+bwd (s)", "peak MiB"]
    table = [
        [
            f"{r['shape']} {tuple(r['size'])}",
            r["method"],
            _cell(r["forward_s"], 3),
            _cell(r["forward_backward_s"], 3),
            _cell(r["peak_mib"], 0),
            *(_cell(r.get(k), 2) for k in ratios),
        ]
        for r in rows
    ]
    return text_table(header + [_RATIO_COLUMNS[k] for k in ratios], table)


def notes(rows: Sequence[Dict]) -> List[str]:
    """Lines under the table: onnxruntime's error per shape, or why it was not measured."""
    lines = [
        f"{r['shape']}: native ran the {', '.join(_pass_ways(r['ways']))} (measured on first use)"
        for r in rows
        if r["method"] == "native" and _pass_ways(r.get("ways") or {})
    ]
    checked = [r for r in rows if r["method"] == ONNXRUNTIME]
    if not checked:
        return lines + [
            "onnxruntime's DeformConv not measured: needs `pip install onnxruntime onnx`"
        ]
    return lines + [
        f"{r['shape']}: onnxruntime DeformConv vs native forward: max abs error "
        f"{r['max_abs_err']:.2e}, max relative error {r['max_rel_err']:.2e}"
        for r in checked
    ]


def _pass_ways(ways: Mapping[str, str]) -> List[str]:
    """``"fused forward"``-style names of the whole-pass ways in :func:`native.chosen_ways`."""
    return [
        f"{way} {key.split('_pass', 1)[0]}"
        for key, way in ways.items()
        if key.startswith(("forward_pass", "backward_pass"))
    ]


def plot(rows: Sequence[Dict], path: str) -> None:
    """Grouped bars of forward and forward+backward time per shape and method (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(methods)
    for ax, key, title in zip(
        axes, ("forward_s", "forward_backward_s"), ("forward", "forward + backward")
    ):
        cell = {(r["shape"], r["method"]): r.get(key) for r in rows}
        for i, method in enumerate(methods):
            values = [math.nan if cell[s, method] is None else cell[s, method] for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], values, width, label=method)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes)
        ax.set_yscale("log")
        ax.set_ylabel("seconds (median)")
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    worker_main(measure)
