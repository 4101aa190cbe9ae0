"""Acceptance check of a (GPU) machine in one command: environment, exactness against the
float64 reference, op and model speed, profile, eval and DDP; reports rewritten per section.

Exit status: 0 all passed; 1 an exactness check failed (or crashed or was skipped for time);
3 another section failed; 2 a bad command line.
"""

import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from importlib.util import find_spec
from typing import Dict, List, Optional, Sequence

import detectron2
import torch
import torch.distributed as dist
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import ProfilerActivity, profile

from ..checkpoint.atomic import atomic_write_text
from ..errors import UserInputError
from ..layers import available_backends, reference
from ..layers.backends import resolve_backend
from .benchmark import model_steps
from .benchmark_ops import SHAPES, op_inputs, op_steps
from .cli import tool_parser
from .timing import (
    InProcessSteps,
    PeakMemory,
    count_syncs,
    detection_batch,
    interleaved_times,
    summarize,
    text_table,
    time_call,
    training_step,
)

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
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def check_environment(ctx: Dict) -> Dict:
    device = ctx["device"]
    env = dict(python=platform.python_version(), platform=platform.platform(),
               torch=torch.__version__, torch_cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version(), torchvision=torchvision.__version__,
               detectron2=detectron2.__version__, detectron2_C=bool(find_spec("detectron2._C")),
               device=str(device), cpu_count=os.cpu_count())  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        driver = shutil.which(query[0]) and subprocess.check_output(query, text=True).strip()
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability="%d.%d" % torch.cuda.get_device_capability(device),
                   driver=driver,
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   tf32_cudnn=torch.backends.cudnn.allow_tf32)  # fmt: skip
    return dict(env, backends=available_backends(device), auto=resolve_backend("auto", device))


def check_exactness(ctx: Dict) -> Dict:
    rows = []
    plan = itertools.product(reference.reference_cases(ctx["quick"]), ("DCNv2", "DCNv1"),
                             available_backends(ctx["device"]), reference.TOLERANCES)  # fmt: skip
    for case, op, backend, dtype in plan:
        label = dict(case=case["name"], op=op, backend=backend, dtype=str(dtype)[6:])
        try:
            errors = reference.backend_errors(case, backend, op == "DCNv2", dtype, ctx["device"])
        except Exception as e:  # a backend that cannot run this call: a failure
            rows.append(dict(label, tensor="*", ok=False, gating=True, error=repr(e)))
            continue
        for name, err in errors.items():
            gating = not reference.known_difference(backend, case, name)
            ok = err <= reference.TOLERANCES[dtype]
            rows.append(dict(label, tensor=name, max_rel=err, ok=ok, gating=gating))
    failures = sum(r["gating"] and not r["ok"] for r in rows)
    return {"rows": rows, "failures": failures, "passed": not failures}


def check_speed(ctx: Dict) -> Dict:
    """conv2d and every backend at ResNet shapes (batch 2), interleaved per shape; seconds."""
    device = ctx["device"]
    shapes = {"tiny": (2, 8, 12, 10)} if ctx["quick"] else SHAPES
    precisions = [torch.float32, torch.float16, torch.bfloat16][: 3 if device.type == "cuda" else 1]
    methods, rows, repeats = ["conv2d"] + available_backends(device), [], 3 if ctx["quick"] else 20
    for precision, (shape, size) in itertools.product(precisions, shapes.items()):
        leaves = [t.to(device).requires_grad_() for t in op_inputs(size)]
        workers, peaks = {}, {}
        for method in methods:
            fwd, fwd_bwd = op_steps(method, leaves, precision)
            fwd_bwd()  # one-time costs
            with PeakMemory(device) as memory:
                fwd_bwd()
            peaks[method] = memory.growth_mib
            workers[method] = InProcessSteps({"fwd": fwd, "fwd_bwd": fwd_bwd})
        times = interleaved_times(workers, ("fwd", "fwd_bwd"), repeats, 2)
        for method in methods:
            row = dict(precision=str(precision)[6:], shape=shape, method=method)
            for step, series in times[method].items():
                stats = summarize(series)  # seconds
                row.update({f"{step}_{k}": stats[k] for k in ("median_s", "iqr_s")})
            rows.append(dict(row, peak_mib=peaks[method]))
    return {"rows": rows, "repeats": repeats}


def _model_configs(ctx: Dict) -> List[Dict]:
    """Every backend on the seed config and the plain-conv model, without and with AMP."""
    models = [(b, SEED_CONFIG) for b in available_backends(ctx["device"])] + [
        ("plain", PLAIN_CONFIG)
    ]
    return [dict(model=m, config=c, amp=amp) for amp in (False, True) for m, c in models]


def _build(ctx: Dict, spec: Dict):
    """A model of ``spec`` with equal work in its heads; its training step and its inference."""
    backend = "auto" if spec["model"] == "plain" else spec["model"]
    opts = ["MODEL.DCNV2.BACKEND", backend] + (QUICK_MODEL_OPTS if ctx["quick"] else [])
    size = (64, 96) if ctx["quick"] else (800, 1216)
    _, model, make_step = model_steps(spec["config"], opts, ctx["device"], size, amp=spec["amp"])
    return model, make_step("train"), make_step("inference")


def check_model(ctx: Dict) -> Dict:
    """Every configuration in interleaved rounds on one fixed batch, after warm-up rounds."""
    specs, workers, steps, peaks, errors = _model_configs(ctx), {}, {}, {}, {}
    for i, spec in enumerate(specs):
        try:
            _, train, infer = _build(ctx, spec)
            train()  # one-time costs
            with PeakMemory(ctx["device"]) as memory:
                train()
        except Exception as e:  # one configuration failing (memory, a kernel) spares the others
            errors[i] = f"{type(e).__name__}: {str(e)[:300]}"
            continue
        steps[i], peaks[i] = train, memory.growth_mib
        workers[i] = InProcessSteps({"train": train, "infer": infer})
    start = time.monotonic()
    interleaved_times(workers, ("train", "infer"), 0, ctx["warmup"])
    per_round = (time.monotonic() - start) / max(ctx["warmup"], 1)
    # At most half the time left: the later sections need theirs.
    repeats = max(3, min(ctx["iters"], int((ctx["deadline"] - time.monotonic()) / 2 / per_round)))
    times = interleaved_times(workers, ("train", "infer"), repeats, 0)
    rows = [dict(spec, error=errors[i]) for i, spec in enumerate(specs) if i in errors]
    for i in steps:
        losses = steps[i].loop.storage.history("total_loss").values()
        row = dict(specs[i], peak_mib=peaks[i], finite=all(math.isfinite(v) for v, _ in losses))
        for step in ("train", "infer"):
            row.update({f"{step}_{k}": v for k, v in summarize(times[i][step]).items()})
        rows.append(row)
    for row, plain in itertools.product(rows, rows):
        if plain["model"] == "plain" and plain["amp"] == row["amp"] and "finite" in plain:
            for step in ("train", "infer"):
                row[f"{step}_vs_plain"] = row.get(f"{step}_median_s", math.nan) / plain[
                    f"{step}_median_s"]  # fmt: skip
    problems = [f"{r['model']} amp={r['amp']}: {r.get('error', 'non-finite loss')}"
                for r in rows if not r.get("finite")]  # fmt: skip
    return {"rows": rows, "repeats": repeats, "problems": problems, "passed": not problems}


def check_profile(ctx: Dict) -> Dict:
    """Per backend and precision: top kernels (CPU ops on CPU), CPU time, syncs of one step."""
    cuda = ctx["device"].type == "cuda"
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = []
    for spec in (s for s in _model_configs(ctx) if s["model"] != "plain"):
        try:
            _, train, _ = _build(ctx, spec)
            train()
            train()
            with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as p:
                step_s = time_call(train)
        except Exception as e:  # one configuration failing spares the others
            rows.append(dict(spec, error=f"{type(e).__name__}: {str(e)[:300]}"))
            continue
        events = sorted(p.key_averages(), key=lambda e: getattr(e, key), reverse=True)
        top = [dict(name=e.key[:80], calls=e.count, ms=getattr(e, key) / 1e3) for e in events]
        cpu_ms = sum(e.self_cpu_time_total for e in events) / 1e3
        rows.append(dict(spec, step_s=step_s, cpu_ms=cpu_ms, top=top[: ctx["top"]],
                         **count_syncs(train, cuda)))  # fmt: skip
    return {"rows": rows, "sorted_by": "device time" if cuda else "CPU time"}


def check_eval(ctx: Dict) -> Dict:
    """``train_net.py --eval-only`` of the seed config, random weights, synthetic val split."""
    opts = ["MODEL.DEVICE", str(ctx["device"]), "MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.NUM_CLASSES",
            "3", "DATASETS.TEST", "('dcnv2_synthetic_val',)", "DATASETS.TRAIN", "()", "OUTPUT_DIR",
            os.path.join(ctx["work_dir"], "eval"), "DATALOADER.NUM_WORKERS", "0"]  # fmt: skip
    opts += QUICK_MODEL_OPTS if ctx["quick"] else []
    cmd = [sys.executable, "train_net.py", "--eval-only", "--config-file", "configs/" + SEED_CONFIG]
    path = os.pathsep.join(filter(None, [REPO + "/projects", os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, DETECTRON2_DATASETS=ctx["work_dir"] + "/datasets")
    proc = subprocess.run(cmd + opts, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=max(ctx["deadline"] - time.monotonic(), 5))  # fmt: skip
    output = proc.stdout + proc.stderr
    results = [ln for ln in output.splitlines() if "copypaste:" in ln][-3:]
    return dict(returncode=proc.returncode, passed=proc.returncode == 0, results=results,
                tail=output[-1500:])  # fmt: skip


def check_ddp(ctx: Dict) -> Dict:
    """Training iterations of the seed model in DDP, world size 1 (NCCL; gloo on CPU)."""
    device, quick = ctx["device"], ctx["quick"]
    group = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(group, store=dist.HashStore(), world_size=1, rank=0)
    try:
        model, _, _ = _build(ctx, dict(model="auto", config=SEED_CONFIG, amp=False))
        ids = [device.index or 0] if device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        size = (64, 96) if quick else (800, 1216)
        step = training_step(ddp, detection_batch(2, *size, boxes_per_image=3))
        for _ in range(2 if quick else 5):
            step()
        finite = all(math.isfinite(v) for v, _ in step.loop.storage.history("total_loss").values())
        return dict(process_group=dist.get_backend(), world_size=dist.get_world_size(),
                    wrapped=type(ddp).__name__, finite=finite, passed=finite)  # fmt: skip
    finally:
        dist.destroy_process_group()


_CHECKS = dict(environment=check_environment, exactness=check_exactness, speed=check_speed,
               model=check_model, profile=check_profile, eval=check_eval,
               ddp=check_ddp)  # fmt: skip


def _cell(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v).replace("|", "/").replace("\n", " ")


def _rows_md(rows: List[Dict], skip=("config", "top", "train_runs", "infer_runs")) -> str:
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in skip]
    return text_table(keys, [[_cell(r.get(k, "-")) for k in keys] for r in rows])


def _section_md(name: str, data: Dict) -> List[str]:
    if name == "exactness":  # one column per backend
        backends, cells = list(dict.fromkeys(r["backend"] for r in data["rows"])), {}
        for r in data["rows"]:
            mark = "ok" if r["ok"] else ("FAIL" if r["gating"] else "differs (known)")
            text = f"ERROR {r['error'][:80]}" if "error" in r else f"{r['max_rel']:.1e} {mark}"
            cells.setdefault((r["case"], r["op"], r["dtype"], r["tensor"]), {})[r["backend"]] = text
        rows = [[*k, *(c.get(b, "-") for b in backends)] for k, c in cells.items()]
        return [f"Max abs error / max abs reference value. Gating failures: {data['failures']}.",
                "", text_table(["case", "op", "dtype", "tensor", *backends], rows)]  # fmt: skip
    if name == "profile":
        lines = []
        for r in data["rows"]:
            if "error" in r:
                lines += [f"**{r['model']}, AMP {r['amp']}**: {r['error']}", ""]
                continue
            lines += [f"**{r['model']}, AMP {r['amp']}**: step {_cell(r['step_s'])} s (profiled), "
                      f"CPU ops {r['cpu_ms']:.1f} ms, host syncs {r['syncs']} (in layers: "
                      f"{r['syncs_in_layers']}); top by {data['sorted_by']}:", "",
                      _rows_md(r["top"]), ""]  # fmt: skip
        return lines
    if name in ("speed", "model"):  # medians and IQR of interleaved rounds; ratios to plain
        return [f"Timed rounds: {data.get('repeats', 'see options')}.", "", _rows_md(data["rows"])]
    tail = ["```", data["tail"], "```"] if data.get("tail") else []
    return [_rows_md([{"key": k, "value": v} for k, v in data.items() if k != "tail"])] + tail


def format_markdown(report: Dict) -> str:
    """The report as Markdown: the options, then one part per section."""
    lines = ["# dcnv2 GPU check", "", f"Exit status: {report.get('exit_status')}; options: "
             f"{report['options']}", ""]  # fmt: skip
    for name, section in report["sections"].items():
        lines += [f"## {name}: {section['status']} ({section.get('seconds', 0):.1f} s)", ""]
        if section.get("error"):
            lines += ["```", section["error"][-3000:], "```", ""]
        if section.get("data"):
            lines += _section_md(name, section["data"]) + [""]
    return "\n".join(lines)


def _exit_status(report: Dict) -> int:
    exact = report["sections"].get("exactness")
    if exact is not None and exact["status"] != "ok":
        return 1
    return 3 if any(s["status"] in ("failed", "error") for s in report["sections"].values()) else 0


def run_check(out_dir: str, device: str = "cuda", quick: bool = False, time_budget: float = 600,
              sections: Sequence[str] = SECTIONS, work_dir: Optional[str] = None,
              iters: Optional[int] = None) -> int:  # fmt: skip
    """Runs the selected sections into ``out_dir``/gpu_check.{json,md}; returns the exit status."""
    os.makedirs(out_dir, exist_ok=True)
    ctx = dict(device=torch.device(device), quick=quick, deadline=time.monotonic() + time_budget,
               work_dir=work_dir or tempfile.mkdtemp(prefix="dcnv2_gpu_check_"),
               iters=iters or (3 if quick else 30), warmup=1 if quick else 3,
               top=5 if quick else 12)  # fmt: skip
    options = dict(device=device, quick=quick, time_budget=time_budget, iters=ctx["iters"])
    report = {"options": options, "sections": {}}
    for name in (s for s in SECTIONS if s in sections):
        if time.monotonic() >= ctx["deadline"]:
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
                torch.cuda.empty_cache()  # a no-op without CUDA
            report["sections"][name]["seconds"] = time.perf_counter() - start
        report["exit_status"] = _exit_status(report)
        json_text = json.dumps(report, indent=1, default=str)
        atomic_write_text(os.path.join(out_dir, "gpu_check.json"), json_text)
        atomic_write_text(os.path.join(out_dir, "gpu_check.md"), format_markdown(report))
    return report["exit_status"]


def main(argv: Optional[Sequence[str]] = None) -> int:
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
        raise UserInputError(f"--iters {args.iters}: expected at least 3 timed rounds")
    status = run_check(args.out, args.device, args.quick, args.time_budget, args.sections,
                       args.work_dir, args.iters)  # fmt: skip
    print(f"[gpu_check] report: {os.path.join(args.out, 'gpu_check.md')}; exit status {status}")
    return status
