"""Acceptance check of a (GPU) machine in one command, the logic of ``tools/gpu_check.py``.

Sections: environment; exactness (every backend against the float64 reference, through the
helpers the test suite uses: :mod:`dcnv2.layers.reference`); speed (op level); model (training
and inference of every backend, with and without AMP, and the plain-conv baseline, interleaved);
profile (top kernels, CPU time and host syncs of one training step); eval; ddp. Each runs in its
own ``try``; the JSON and Markdown reports are rewritten after every section.

Exit status: 0 all passed; 1 an exactness check failed (or that section crashed or was skipped
for time); 3 another section failed; 2 a bad command line.
"""

import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from typing import Dict, List, Optional, Sequence

import torch

from ..layers import reference
from .cli import UserInputError
from .timing import (
    InProcessSteps,
    PeakMemory,
    detection_batch,
    interleaved_times,
    summarize,
    text_table,
    time_call,
    training_step,
)

__all__ = ["SECTIONS", "format_markdown", "main", "run_check"]

SECTIONS = ("environment", "exactness", "speed", "model", "profile", "eval", "ddp")
SEED_CONFIG = "faster_rcnn_R50_mdconv_FPN_1x.yaml"
PLAIN_CONFIG = "faster_rcnn_R50_FPN_1x.yaml"
# --quick: the seed architecture at a fraction of its width on 64x96 images (wiring, not speed).
QUICK_MODEL_OPTS = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.RESNETS.WIDTH_PER_GROUP", "8",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "32", "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "100",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", "MODEL.RPN.PRE_NMS_TOPK_TEST", "100",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "50", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32", "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "96",
]  # fmt: skip
SPEED_SHAPES = {"res3": (128, 100, 152), "res4": (256, 50, 76), "res5": (512, 25, 38)}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _safe(fn):
    """``fn()``, or its error as text: one missing fact must not lose the others."""
    try:
        return fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def _detectron2_c() -> str:
    from detectron2 import _C  # noqa: F401

    return "loaded"


def check_environment(ctx: Dict) -> Dict:
    import torchvision

    from ..layers.backends import available_backends, resolve_backend

    device = ctx["device"]
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cudnn": _safe(torch.backends.cudnn.version), "torchvision": torchvision.__version__,
           "device": str(device), "cpu_count": os.cpu_count()}  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability="%d.%d" % torch.cuda.get_device_capability(device),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   tf32_cudnn=torch.backends.cudnn.allow_tf32)  # fmt: skip
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        env["driver"] = _safe(lambda: subprocess.check_output(query, text=True).split()[0])
    import detectron2

    env["detectron2"] = detectron2.__version__
    env["detectron2_C"] = _safe(_detectron2_c)
    env["backends"] = available_backends(device)
    env["auto_backend"] = resolve_backend("auto", device)
    return env


def check_exactness(ctx: Dict) -> Dict:
    from ..layers import available_backends

    rows = []
    for case in reference.reference_cases(ctx["quick"]):
        for modulated in (True, False):
            for backend in available_backends(ctx["device"]):
                for dtype in reference.TOLERANCES:
                    label = dict(case=case["name"], op="DCNv2" if modulated else "DCNv1",
                                 backend=backend, dtype=str(dtype).replace("torch.", ""))  # fmt: skip
                    try:
                        errors = reference.backend_errors(
                            case, backend, modulated, dtype, ctx["device"]
                        )
                    except Exception as e:  # a backend that cannot run this call: a failure
                        rows.append(dict(label, tensor="*", ok=False, gating=True, error=repr(e)))
                        continue
                    for name, err in errors.items():
                        # torchvision's offset/mask gradient at integer points: informational.
                        known = backend == "torchvision" and case["integer_points"]
                        rows.append(dict(label, tensor=name, max_rel=err,
                                         ok=err <= reference.TOLERANCES[dtype],
                                         gating=not (known and name in ("offset", "mask"))))  # fmt: skip
    failures = sum(r["gating"] and not r["ok"] for r in rows)
    return {"rows": rows, "failures": failures, "passed": not failures}


def check_speed(ctx: Dict) -> Dict:
    """Forward and forward+backward of conv2d and every backend, interleaved per shape."""
    from ..layers import available_backends, modulated_deform_conv

    device, quick = ctx["device"], ctx["quick"]
    shapes = {"tiny": (8, 12, 10)} if quick else SPEED_SHAPES
    precisions = [torch.float32] + (
        [torch.float16, torch.bfloat16] if device.type == "cuda" else []
    )
    methods = ["conv2d"] + available_backends(device)
    rows = []
    for precision in precisions:
        for shape, (c, h, w) in shapes.items():
            g = torch.Generator().manual_seed(0)
            x, weight = torch.randn(2, c, h, w, generator=g), torch.randn(c, c, 3, 3, generator=g)
            offset, mask = torch.randn(2, 18, h, w, generator=g) * 2, torch.rand(
                2, 9, h, w, generator=g
            )
            leaves = [t.to(device).requires_grad_() for t in (x, weight * 0.01, offset, mask)]
            workers, peaks = {}, {}
            for method in methods:

                def forward(method=method):
                    x, weight, offset, mask = leaves
                    with torch.autocast(device.type, precision, enabled=precision != torch.float32):
                        if method == "conv2d":
                            return torch.nn.functional.conv2d(x, weight, padding=1)
                        return modulated_deform_conv(
                            x, offset, mask, weight, padding=1, backend=method
                        )

                def fwd(forward=forward):
                    with torch.no_grad():
                        forward()

                def fwd_bwd(forward=forward):
                    forward().float().sum().backward()
                    for t in leaves:
                        t.grad = None

                fwd_bwd()
                with PeakMemory(device) as memory:
                    fwd_bwd()
                peaks[method] = memory.growth_mib
                workers[method] = InProcessSteps({"fwd": fwd, "fwd_bwd": fwd_bwd})
            times = interleaved_times(workers, ("fwd", "fwd_bwd"), 3 if quick else 20, 2)
            for method in methods:
                row = dict(precision=str(precision)[6:], shape=shape, method=method,
                           peak_mib=peaks[method])  # fmt: skip
                for step in ("fwd", "fwd_bwd"):
                    stats = summarize(times[method][step])
                    row[f"{step}_ms"], row[f"{step}_iqr_ms"] = (
                        stats["median_s"] * 1e3,
                        stats["iqr_s"] * 1e3,
                    )
                rows.append(row)
    return {"rows": rows, "batch": 2}


def _model_configs(ctx: Dict) -> List[Dict]:
    """(label, config file, backend, amp) of every model configuration of the model section."""
    from ..layers import available_backends

    names = [(b, SEED_CONFIG, b) for b in available_backends(ctx["device"])]
    names.append(("plain", PLAIN_CONFIG, "auto"))
    return [
        dict(label=l, config=c, backend=b, amp=amp) for amp in (False, True) for l, c, b in names
    ]


def _build(ctx: Dict, spec: Dict):
    """A model of ``spec`` with equal work in its heads, its training step and its inference."""
    from detectron2.modeling import build_model

    from ..config import get_cfg
    from .benchmark import equal_work_heads

    opts = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", str(ctx["device"]), "MODEL.DCNV2.BACKEND",
            spec["backend"]] + (QUICK_MODEL_OPTS if ctx["quick"] else [])  # fmt: skip
    cfg = get_cfg(spec["config"], opts)
    torch.manual_seed(0)
    model = equal_work_heads(build_model(cfg))
    h, w = (64, 96) if ctx["quick"] else (800, 1216)
    batch = detection_batch(2, h, w, boxes_per_image=3, num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    train = training_step(model, batch, amp=spec["amp"])
    image = detection_batch(1, h, w, seed=1)
    precision = torch.float16 if ctx["device"].type == "cuda" else torch.bfloat16

    def infer():
        model.eval()
        with torch.no_grad(), torch.autocast(ctx["device"].type, precision, enabled=spec["amp"]):
            model(image)
        model.train()

    return model, train, infer


def check_model(ctx: Dict) -> Dict:
    """Every configuration in interleaved rounds on one fixed batch, after warm-up rounds."""
    specs = _model_configs(ctx)
    workers, steps, memory = {}, {}, {}
    for i, spec in enumerate(specs):
        model, train, infer = _build(ctx, spec)
        train()  # one-time costs before the memory of one more step
        with PeakMemory(ctx["device"]) as peak:
            train()
        memory[i] = peak.growth_mib
        steps[i] = train
        workers[i] = InProcessSteps({"train": train, "infer": infer})
    start = time.monotonic()
    interleaved_times(workers, ("train", "infer"), 0, ctx["warmup"])
    per_round = (time.monotonic() - start) / max(ctx["warmup"], 1)
    affordable = int(ctx["clock"].left() * 0.5 / per_round)  # leave the later sections time
    repeats = max(3, min(ctx["iters"], affordable))
    times = interleaved_times(workers, ("train", "infer"), repeats, 0)
    rows = []
    for i, spec in enumerate(specs):
        losses = steps[i].loop.storage.history("total_loss").values()
        row = dict(spec, peak_mib=memory[i], losses_finite=all(math.isfinite(v) for v, _ in losses))
        for step in ("train", "infer"):
            row[step] = summarize(times[i][step])
        rows.append(row)
    for row in rows:
        plain = next(r for r in rows if r["label"] == "plain" and r["amp"] == row["amp"])
        for step in ("train", "infer"):
            row[f"{step}_vs_plain"] = row[step]["median_s"] / plain[step]["median_s"]
    problems = [
        f"{r['label']} amp={r['amp']}: non-finite loss" for r in rows if not r["losses_finite"]
    ]
    return {"rows": rows, "repeats": repeats, "warmup": ctx["warmup"], "problems": problems,
            "passed": not problems}  # fmt: skip


def _syncs(step, cuda: bool) -> Dict:
    """Host-device synchronisations of one call of ``step`` (``set_sync_debug_mode``)."""
    if not cuda:
        return {"syncs": "n/a", "syncs_in_layers": "n/a"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    found = [w for w in caught if "synchroniz" in str(w.message)]
    inside = [w for w in found if any(p in w.filename.replace("\\", "/")
                                      for p in ("dcnv2/layers", "detectron2/layers"))]  # fmt: skip
    return {"syncs": len(found), "syncs_in_layers": len(inside)}


def check_profile(ctx: Dict) -> Dict:
    """Per backend and precision: top kernels (CPU ops on CPU), CPU time, syncs of one step."""
    from torch.profiler import ProfilerActivity, profile

    cuda = ctx["device"].type == "cuda"
    rows = []
    for spec in (s for s in _model_configs(ctx) if s["label"] != "plain"):
        _, train, _ = _build(ctx, spec)
        train()
        train()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            step_s = time_call(train)
        events = prof.key_averages()
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        top = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[: ctx["top"]]
        rows.append(dict(spec, step_s=step_s, **_syncs(train, cuda),
                         cpu_ms=sum(e.self_cpu_time_total for e in events) / 1e3,
                         top=[dict(name=e.key[:80], calls=e.count, ms=getattr(e, key, 0) / 1e3)
                              for e in top]))  # fmt: skip
    return {"rows": rows, "sorted_by": "device time" if cuda else "CPU time"}


def _child_env(ctx: Dict) -> Dict[str, str]:
    path = os.pathsep.join(
        p for p in (os.path.join(REPO, "projects"), os.environ.get("PYTHONPATH")) if p
    )
    return dict(os.environ, PYTHONPATH=path,
                DETECTRON2_DATASETS=os.path.join(ctx["work_dir"], "datasets"))  # fmt: skip


def check_eval(ctx: Dict) -> Dict:
    """``train_net.py --eval-only`` of the seed config, random weights, synthetic val split."""
    opts = ["MODEL.DEVICE", str(ctx["device"]), "MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.NUM_CLASSES",
            "3", "DATASETS.TEST", "('dcnv2_synthetic_val',)", "DATASETS.TRAIN", "()", "OUTPUT_DIR",
            os.path.join(ctx["work_dir"], "eval"), "DATALOADER.NUM_WORKERS", "0"]  # fmt: skip
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--eval-only", "--config-file",
           os.path.join(REPO, "configs", SEED_CONFIG), *opts,
           *(QUICK_MODEL_OPTS if ctx["quick"] else [])]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_child_env(ctx), capture_output=True, text=True,
                          timeout=max(ctx["clock"].left(), 5))  # fmt: skip
    output = proc.stdout + proc.stderr
    return {"returncode": proc.returncode, "passed": proc.returncode == 0,
            "results": [ln for ln in output.splitlines() if "copypaste:" in ln][-3:],
            "tail": output[-1500:]}  # fmt: skip


def ddp_worker(config: Dict) -> Dict:
    """In a fresh process: a process group of world size 1 (NCCL, gloo on CPU) and training
    iterations of the seed model wrapped in DistributedDataParallel."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(config["device"])
    if device.type == "cuda":
        torch.cuda.set_device(0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0)  # fmt: skip
    try:
        ctx = dict(config, device=device)
        model, _, _ = _build(ctx, dict(config=SEED_CONFIG, backend="auto", amp=False))
        ids = [0] if device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        h, w = (64, 96) if config["quick"] else (800, 1216)
        batch = detection_batch(2, h, w, boxes_per_image=3, num_classes=80)
        step = training_step(ddp, batch)
        for _ in range(config["iters"]):
            step()
        losses = [v for v, _ in step.loop.storage.history("total_loss").values()]
        return {
            "process_group": dist.get_backend(),
            "world_size": dist.get_world_size(),
            "wrapped": type(ddp).__name__,
            "losses_finite": all(map(math.isfinite, losses)),
        }
    finally:
        dist.destroy_process_group()


def check_ddp(ctx: Dict) -> Dict:
    config = {
        "device": str(ctx["device"]),
        "quick": ctx["quick"],
        "iters": 2 if ctx["quick"] else 5,
    }
    code = ("import json, sys; from dcnv2.tools.gpu_check import ddp_worker; "
            "print('GPU_CHECK ' + json.dumps(ddp_worker(json.loads(sys.argv[1]))))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(config)], env=_child_env(ctx),
                          capture_output=True, text=True, timeout=max(ctx["clock"].left(), 5))  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("GPU_CHECK ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"DDP worker exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1].split(" ", 1)[1])
    return dict(result, passed=result["losses_finite"])


_CHECKS = {"environment": check_environment, "exactness": check_exactness, "speed": check_speed,
           "model": check_model, "profile": check_profile, "eval": check_eval, "ddp": check_ddp}  # fmt: skip


def _f(v, digits=3) -> str:
    return "-" if v is None else v if isinstance(v, str) else f"{v:.{digits}g}"


def _section_md(name: str, data: Dict) -> List[str]:
    if name == "exactness":
        backends = list(dict.fromkeys(r["backend"] for r in data["rows"]))
        cells: Dict[tuple, Dict] = {}
        for r in data["rows"]:
            mark = "ok" if r["ok"] else ("FAIL" if r["gating"] else "differs (known)")
            text = f"ERROR {r['error'][:80]}" if "error" in r else f"{r['max_rel']:.1e} {mark}"
            cells.setdefault((r["case"], r["op"], r["dtype"], r["tensor"]), {})[r["backend"]] = text
        rows = [list(k) + [c.get(b, "-") for b in backends] for k, c in cells.items()]
        head = f"Max abs error / max abs reference value. Gating failures: {data['failures']}."
        return [head, "", text_table(["case", "op", "dtype", "tensor", *backends], rows)]
    if name == "speed":
        rows = [[r["precision"], r["shape"], r["method"], _f(r["fwd_ms"]), _f(r["fwd_iqr_ms"]),
                 _f(r["fwd_bwd_ms"]), _f(r["fwd_bwd_iqr_ms"]), _f(r["peak_mib"], 4)]
                for r in data["rows"]]  # fmt: skip
        head = ["precision", "shape", "method", "fwd ms", "IQR", "fwd+bwd ms", "IQR", "peak MiB"]
        return [
            f"Batch {data['batch']}; medians of interleaved rounds.",
            "",
            text_table(head, rows),
        ]
    if name == "model":
        rows = [[r["label"], r["backend"], r["amp"], _f(r["train"]["median_s"]),
                 f"{_f(r['train']['iqr_s'])} ({_f(r['train']['min_s'])}-{_f(r['train']['max_s'])})",
                 f"{r['train_vs_plain']:.2f}x", _f(r["infer"]["median_s"]),
                 f"{r['infer_vs_plain']:.2f}x", _f(r["peak_mib"], 5), r["losses_finite"]]
                for r in data["rows"]]  # fmt: skip
        head = [
            "model",
            "backend",
            "AMP",
            "train s/iter",
            "IQR (min-max)",
            "vs plain",
            "infer s/img",
            "vs plain",
            "step peak MiB",
            "finite",
        ]
        return [f"{data['repeats']} interleaved rounds after {data['warmup']} warm-up rounds, "
                "batch 2 (inference 1), one fixed batch; ratios to the plain model in the same "
                "precision; peak = step's memory above what was allocated before it.", "",
                text_table(head, rows)]  # fmt: skip
    if name == "profile":
        lines = []
        for r in data["rows"]:
            lines += [f"**{r['backend']}, AMP {r['amp']}**: step {_f(r['step_s'])} s, CPU ops "
                      f"{_f(r['cpu_ms'], 4)} ms, host syncs {r['syncs']} (in layers: "
                      f"{r['syncs_in_layers']}); top by {data['sorted_by']}:", "",
                      text_table(["op / kernel", "calls", "ms"],
                                 [[t["name"], t["calls"], _f(t["ms"])] for t in r["top"]]), ""]  # fmt: skip
        return lines
    rows = [
        [k, str(v).replace("|", "/").replace("\n", " ")] for k, v in data.items() if k != "tail"
    ]
    return [text_table(["key", "value"], rows)] + (
        ["```", data["tail"], "```"] if data.get("tail") else []
    )


def format_markdown(report: Dict) -> str:
    """The report as Markdown: the options, then one part per section."""
    lines = ["# dcnv2 GPU check", "", f"Exit status: {report.get('exit_status')}; "
             f"options: {report['options']}", ""]  # fmt: skip
    for name, section in report["sections"].items():
        lines += [f"## {name}: {section['status']} ({section.get('seconds', 0):.1f} s)", ""]
        if section.get("error"):
            lines += ["```", section["error"][-3000:], "```", ""]
        if section.get("data"):
            lines += _section_md(name, section["data"]) + [""]
    return "\n".join(lines)


def _write(report: Dict, out_dir: str) -> None:
    for name, text in (("gpu_check.json", json.dumps(report, indent=1, default=str)),
                       ("gpu_check.md", format_markdown(report))):  # fmt: skip
        with open(os.path.join(out_dir, name + ".tmp"), "w") as f:
            f.write(text)
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))


def _exit_status(report: Dict) -> int:
    exact = report["sections"].get("exactness")
    if exact is not None and exact["status"] != "ok":
        return 1
    failed = any(s["status"] in ("failed", "error") for s in report["sections"].values())
    return 3 if failed else 0


class _Clock:
    def __init__(self, budget: float):
        self.end = time.monotonic() + budget

    def left(self) -> float:
        return self.end - time.monotonic()


def run_check(out_dir: str, device: str = "cuda", quick: bool = False, time_budget: float = 600.0,
              sections: Sequence[str] = SECTIONS, work_dir: Optional[str] = None,
              iters: Optional[int] = None) -> int:  # fmt: skip
    """Runs the selected sections, rewriting ``out_dir``/gpu_check.{json,md} after each.

    Returns:
        The exit status (see the module docstring).
    """
    os.makedirs(out_dir, exist_ok=True)
    ctx = {"device": torch.device(device), "quick": quick, "clock": _Clock(time_budget),
           "work_dir": work_dir or tempfile.mkdtemp(prefix="dcnv2_gpu_check_"),
           "iters": iters or (3 if quick else 30), "warmup": 1 if quick else 3,
           "top": 5 if quick else 12}  # fmt: skip
    report = {"options": {"device": device, "quick": quick, "time_budget": time_budget,
                          "iters": ctx["iters"], "sections": list(sections)}, "sections": {}}  # fmt: skip
    for name in (s for s in SECTIONS if s in sections):
        if ctx["clock"].left() <= 0:
            report["sections"][name] = {"status": "skipped", "reason": "time budget spent"}
        else:
            print(f"[gpu_check] {name} ...", flush=True)
            start = time.perf_counter()
            try:
                data = _CHECKS[name](ctx)
                status = "failed" if data.get("passed") is False else "ok"
                report["sections"][name] = {"status": status, "data": data}
            except Exception:
                report["sections"][name] = {"status": "error", "error": traceback.format_exc()}
            finally:
                if ctx["device"].type == "cuda":
                    torch.cuda.empty_cache()
            report["sections"][name]["seconds"] = time.perf_counter() - start
        report["exit_status"] = _exit_status(report)
        _write(report, out_dir)
    return report["exit_status"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import tool_parser

    parser = tool_parser(__doc__, skip=1)
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny shapes and models, few rounds")
    parser.add_argument("--iters", type=int, help="timed rounds of the model section (30; 3 quick)")
    parser.add_argument("--time-budget", type=float, default=600.0, metavar="SECONDS")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--work-dir", help="scratch folder (synthetic data, outputs)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: no CUDA device is visible to torch here")
    if args.iters is not None and args.iters < 3:
        raise UserInputError(f"--iters {args.iters}: need at least 3 timed rounds")
    status = run_check(args.out, args.device, args.quick, args.time_budget, args.sections,
                       args.work_dir, args.iters)  # fmt: skip
    print(f"[gpu_check] report: {os.path.join(args.out, 'gpu_check.md')}; exit status {status}")
    return status
