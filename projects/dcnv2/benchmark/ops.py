"""Speed and memory of the deformable-conv backends against dense ``conv2d`` on CPU, the logic
of ``tools/benchmark_ops.py``.

Each (shape, method) case runs in a fresh Python process, so that one case's allocator state
and peak memory cannot leak into another's. Peak memory is the resident-set high-water mark
during one forward+backward above the resident set just before it (inputs already allocated;
:class:`.common.PeakRSS`). Times are medians of ``repeats`` runs after one warm-up run.
"""

import statistics
from typing import Dict, List, Mapping, Sequence, Tuple

from .common import PeakRSS, run_in_fresh_process, text_table, time_runs, worker_main

__all__ = ["SHAPES", "parse_shape", "measure", "run", "format_table", "plot"]

# ResNet-50 3x3 convs of an 800x1216 input, batch 2: name -> (N, C, H, W); C_out = C.
SHAPES = {
    "res3": (2, 128, 100, 152),
    "res4": (2, 256, 50, 76),
    "res5": (2, 512, 25, 38),
}


def parse_shape(text: str) -> Tuple[str, Tuple[int, int, int, int]]:
    """``"res4"`` (a name of :data:`SHAPES`) or ``"NAME=N,C,H,W"`` -> (name, size).

    Raises:
        ValueError: neither form.
    """
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


def measure(spec: Mapping) -> Dict[str, float]:
    """One case, in this process: ``spec`` holds ``size`` (N, C, H, W), ``method`` ("conv2d" or
    a backend), ``repeats`` and ``threads``. Returns median times (s) and peak memory (MiB)."""
    import torch
    import torch.nn.functional as F

    from ..layers import modulated_deform_conv

    torch.set_num_threads(spec["threads"])
    method = spec["method"]
    n, c, h, w = spec["size"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g).requires_grad_()
    weight = (torch.randn(c, c, 3, 3, generator=g) * 0.01).requires_grad_()
    offset = (torch.randn(n, 18, h, w, generator=g) * 2).requires_grad_()
    mask = torch.rand(n, 9, h, w, generator=g).requires_grad_()

    def forward():
        if method == "conv2d":
            return F.conv2d(x, weight, padding=1)
        return modulated_deform_conv(x, offset, mask, weight, padding=1, backend=method)

    def forward_backward():
        forward().sum().backward()
        for t in (x, weight, offset, mask):
            t.grad = None

    def no_grad_forward():
        with torch.no_grad():
            forward()

    # Memory first, on a process that has run nothing yet.
    with PeakRSS() as memory:
        forward_backward()
    repeats = spec["repeats"]
    return {
        "forward_s": statistics.median(time_runs(no_grad_forward, 1, repeats)),
        "forward_backward_s": statistics.median(time_runs(forward_backward, 1, repeats)),
        "peak_mib": memory.growth_mib,
    }


def _methods() -> List[str]:
    from ..layers import available_backends

    return ["conv2d"] + available_backends("cpu")


def run(shapes: Mapping[str, Sequence[int]], repeats: int = 3, threads: int = 2) -> List[Dict]:
    """Benchmark every CPU backend and conv2d on ``shapes`` (name -> (N, C, H, W)), one fresh
    process per case.

    Returns:
        list[dict]: per (shape, method): the :func:`measure` result, ``shape``, ``method``,
        ``size`` and the ratios to conv2d's (``*_vs_conv2d``) and torchvision's
        (``*_vs_torchvision``, when torchvision is a backend here) of the same shape.
    """
    rows = []
    for shape, size in shapes.items():
        results = {}
        for method in _methods():
            spec = dict(size=list(size), method=method, repeats=repeats, threads=threads)
            results[method] = run_in_fresh_process(__name__, spec, f"{shape} with {method}")
        for method, r in results.items():
            r.update(shape=shape, method=method, size=list(size))
            for key in ("forward_s", "forward_backward_s", "peak_mib"):
                name = key.replace("_s", "").replace("_mib", "")
                for ref in ("conv2d", "torchvision"):
                    if ref in results:
                        r[f"{name}_vs_{ref}"] = _ratio(r[key], results[ref][key])
            rows.append(r)
    return rows


def _ratio(value, reference):
    return None if value is None or not reference else value / reference


def _cell(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(rows: Sequence[Dict]) -> str:
    """Markdown table; ratios are time (or memory) divided by the reference's."""
    header = [
        "shape", "method", "fwd (s)", "fwd+bwd (s)", "peak MiB", "fwd / conv2d",
        "fwd+bwd / conv2d", "fwd / tv", "fwd+bwd / tv", "peak / tv",
    ]  # fmt: skip
    ratios = (
        "forward_vs_conv2d",
        "forward_backward_vs_conv2d",
        "forward_vs_torchvision",
        "forward_backward_vs_torchvision",
        "peak_vs_torchvision",
    )
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
    return text_table(header, table)


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
        for i, method in enumerate(methods):
            values = [next(r[key] for r in rows if r["shape"] == s and r["method"] == method)
                      for s in shapes]  # fmt: skip
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
