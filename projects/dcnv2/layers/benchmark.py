"""Speed and memory of the deformable-conv backends against dense ``conv2d`` on CPU.

Each (shape, method) case runs in a fresh Python process, so that one case's allocator state
and peak memory cannot leak into another's. Peak memory is the process's resident-set
high-water mark (``ru_maxrss``) during one forward+backward, minus the resident set just
before it (inputs already allocated); it counts every allocation torch makes on the CPU,
including the allocator's freed-but-kept pages. Times are medians of ``repeats`` runs after one
warm-up run. Used by ``tools/benchmark_ops.py``.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

__all__ = ["SHAPES", "run", "format_table", "plot", "main"]

# ResNet-50 3x3 convs of an 800x1216 input, batch 2: name -> (N, C, H, W); C_out = C.
SHAPES = {
    "res3": (2, 128, 100, 152),
    "res4": (2, 256, 50, 76),
    "res5": (2, 512, 25, 38),
    "tiny": (1, 4, 9, 7),  # for tests
}


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() // 1024


def _measure(shape: str, method: str, repeats: int, threads: int) -> Dict[str, float]:
    """Run one case in this process; return times (s) and peak memory (MiB)."""
    import torch
    import torch.nn.functional as F

    from dcnv2.layers import modulated_deform_conv

    torch.set_num_threads(threads)
    n, c, h, w = SHAPES[shape]
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
    before = _rss_kib()
    forward_backward()
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024

    def median_time(fn):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return {
        "forward_s": median_time(no_grad_forward),
        "forward_backward_s": median_time(forward_backward),
        "peak_mib": peak_mib,
    }


def _methods() -> List[str]:
    from dcnv2.layers import available_backends

    return ["conv2d"] + available_backends("cpu")


def run(shapes: Sequence[str], repeats: int = 3, threads: int = 2) -> List[Dict]:
    """Benchmark every CPU backend and conv2d on ``shapes``, one fresh process per case."""
    rows = []
    for shape in shapes:
        results = {}
        for method in _methods():
            cmd = [sys.executable, "-m", __name__, "--worker", shape, method]
            cmd += ["--repeats", str(repeats), "--threads", str(threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[method] = json.loads(out.strip().splitlines()[-1])
        for method, r in results.items():
            r.update(shape=shape, method=method, size=list(SHAPES[shape]))
            for key in ("forward_s", "forward_backward_s", "peak_mib"):
                ref = results["conv2d"][key]
                r[key.replace("_s", "").replace("_mib", "") + "_vs_conv2d"] = r[key] / ref
                if "torchvision" in results:
                    tv = results["torchvision"][key]
                    name = key.replace("_s", "").replace("_mib", "") + "_vs_torchvision"
                    r[name] = r[key] / tv
            rows.append(r)
    return rows


def format_table(rows: List[Dict]) -> str:
    """Markdown table; ratios are time (or memory) divided by the reference's."""
    head = (
        "| shape | method | fwd (s) | fwd+bwd (s) | peak MiB | fwd / conv2d | fwd+bwd / conv2d "
        "| fwd / tv | fwd+bwd / tv | peak / tv |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        tv = [r.get(k) for k in ("forward_vs_torchvision", "forward_backward_vs_torchvision")]
        tv.append(r.get("peak_vs_torchvision"))
        tv_cells = " | ".join("-" if v is None else f"{v:.2f}" for v in tv)
        lines.append(
            f"| {r['shape']} {tuple(r['size'])} | {r['method']} | {r['forward_s']:.3f} | "
            f"{r['forward_backward_s']:.3f} | {r['peak_mib']:.0f} | {r['forward_vs_conv2d']:.2f} "
            f"| {r['forward_backward_vs_conv2d']:.2f} | {tv_cells} |"
        )
    return "\n".join(lines)


def plot(rows: List[Dict], path: str) -> None:
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


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["res3", "res4", "res5"], choices=SHAPES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--plot", help="draw a PNG bar chart here")
    parser.add_argument("--worker", nargs=2, metavar=("SHAPE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_measure(*args.worker, args.repeats, args.threads)))
        return []
    rows = run(args.shapes, args.repeats, args.threads)
    print(format_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    if args.plot:
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
