"""Acceptance check of a (GPU) machine in one command, the logic of ``tools/gpu_check.py``.

Sections, in order of importance; each runs in its own ``try``, records a failure as its
traceback and lets the next one run; the JSON and Markdown reports are rewritten after every
section, so a run killed at a time limit still leaves what it measured. Once the time budget is
spent, the remaining sections are recorded as skipped.

    environment  GPU, driver, torch/CUDA/cuDNN, torchvision, detectron2 (and whether its compiled
                 ``_C`` loads), the deformable-conv backends available on the device.
    exactness    every backend on the device against the float64 CPU reference
                 (:mod:`dcnv2.layers.reference`): forward and the gradients of input, offset,
                 mask, weight and bias; modulated and DCNv1; random, strided-integer and
                 integer/border offsets. torchvision's offset gradient at integer points is
                 known to differ from detectron2's: reported, not counted as a failure there.
    speed        median time (CUDA events) and peak memory (``max_memory_allocated``) of each
                 backend and dense ``conv2d`` at ResNet res3/res4/res5 shapes, forward and
                 forward+backward, float32 and under autocast float16/bfloat16.
    model        the seed config on the device with each backend: training iterations on the
                 synthetic dataset with and without ``SOLVER.AMP.ENABLED`` (losses finite,
                 s/iter, peak memory) and inference s/image.
    eval         one ``train_net.py --eval-only`` run (subprocess) on the synthetic val split.
    ddp          a single process (world size 1) with an NCCL (gloo on CPU) process group
                 training a few iterations through ``DistributedDataParallel``.

Exit status: 0 when every exactness check passed and no section failed; 1 when an exactness
check failed (or the exactness section crashed or was skipped for time); 3 when exactness
passed but another section failed; 2 for a bad command line.
"""

import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..layers import reference as _reference
from .cli import UserInputError

__all__ = ["SECTIONS", "run_check", "format_markdown", "main"]

SECTIONS = ("environment", "exactness", "speed", "model", "eval", "ddp")
# Seconds each section may take at most (full run); a section also stops early enough to leave
# the later sections their minimum (_MIN_LEFT).
_CAPS = {"environment": 30, "exactness": 60, "speed": 120, "model": 150, "eval": 60, "ddp": 60}
_MIN_LEFT = {"environment": 5, "exactness": 10, "speed": 20, "model": 30, "eval": 20, "ddp": 15}
# Tolerance of the largest error relative to the largest reference magnitude of each tensor.
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4}
SEED_CONFIG = "faster_rcnn_R50_mdconv_FPN_1x.yaml"
# --quick: the seed architecture at a fraction of its width, on 64-96 px images; it checks the
# wiring (build, train, evaluate, DDP), not speed.
QUICK_MODEL_OPTS = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.RESNETS.WIDTH_PER_GROUP", "8",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "32", "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "100",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", "MODEL.RPN.PRE_NMS_TOPK_TEST", "100",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "50", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32", "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
]  # fmt: skip
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


class _Clock:
    """The run's time budget; ``section_end`` is when the current section must stop."""

    def __init__(self, budget: float):
        self.start = time.monotonic()
        self.end = self.start + budget
        self.section_end = self.end

    def left(self) -> float:
        return min(self.end, self.section_end) - time.monotonic()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _safe(fn: Callable):
    """``fn()``, or the error it raised as text: one missing fact must not lose the others."""
    try:
        return fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"


# --- environment -------------------------------------------------------------------------------


def check_environment(ctx: Dict) -> Dict:
    import torchvision

    from ..layers import native_cpp
    from ..layers.backends import available_backends, resolve_backend

    device = ctx["device"]
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": _safe(torch.backends.cudnn.version),
        "torchvision": torchvision.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": str(device),
        "cpu_count": os.cpu_count(),
    }
    try:
        import numpy

        env["numpy"] = numpy.__version__
    except ImportError:
        env["numpy"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["capability"] = "%d.%d" % torch.cuda.get_device_capability(device)
        env["cuda_arch_list"] = torch.cuda.get_arch_list()
        # TF32 would change float32 results of the matmul-based native backend and of conv2d.
        env["tf32_matmul"] = _safe(lambda: torch.backends.cuda.matmul.allow_tf32)
        env["tf32_cudnn"] = _safe(lambda: torch.backends.cudnn.allow_tf32)
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,driver_version,memory.total"
        proc = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True
        )
        env["nvidia_smi"] = (proc.stdout or proc.stderr).strip()
        if proc.returncode == 0 and proc.stdout.strip():
            env["driver"] = proc.stdout.splitlines()[0].split(",")[1].strip()
    try:
        import detectron2

        env["detectron2"] = detectron2.__version__
        env["detectron2_path"] = os.path.dirname(detectron2.__file__)
        try:
            from detectron2 import _C  # noqa: F401

            env["detectron2_C"] = "loaded"
        except ImportError as e:
            env["detectron2_C"] = f"not loaded: {e}"
    except ImportError as e:
        env["detectron2"] = f"not importable: {e}"
    # Building the CPU kernels takes a while and says nothing about CUDA.
    if device.type == "cpu" and os.environ.get("DCNV2_NATIVE_IMPL", "auto") != "torch":
        env["native_cpp"] = native_cpp.is_available()
    else:
        env["native_cpp"] = "not used here"
    env["backends"] = available_backends(device)
    env["auto_backend"] = resolve_backend("auto", device)
    return env


# --- exactness ---------------------------------------------------------------------------------


def _exactness_cases(quick: bool) -> List[Dict]:
    """(name, tensors, geometry) of the checked calls; float64 CPU tensors, bias included."""
    cases = []
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    # Random offsets, groups and deformable groups.
    n, c_in, c_out, size, dg, groups = 2, 4, 6, (7, 9) if quick else (9, 11), 2, 2
    cases.append(
        dict(
            name="random",
            x=rand(n, c_in, *size),
            offset=rand(n, 2 * dg * 9, *size) * 2.5,
            mask=torch.rand(n, dg * 9, *size, generator=g, dtype=torch.float64),
            weight=rand(c_out, c_in // groups, 3, 3),
            bias=rand(c_out),
            geometry=((1, 1), (1, 1), (1, 1), groups, dg),
            integer_points=False,
        )
    )
    # Integer offsets with stride and dilation 2: every sample on a pixel or outside.
    size = (8, 10)
    ho, wo = _reference.output_size(size, (3, 3), (2, 2), (2, 2), (2, 2))
    cases.append(
        dict(
            name="integer",
            x=rand(1, 4, *size),
            offset=torch.randint(-3, 4, (1, 18, ho, wo), generator=g).double(),
            mask=torch.rand(1, 9, ho, wo, generator=g, dtype=torch.float64),
            weight=rand(3, 4, 3, 3),
            bias=rand(3),
            geometry=((2, 2), (2, 2), (2, 2), 1, 1),
            integer_points=True,
        )
    )
    # tests/layers/test_native.py's border case: points exactly on -1, 0, H-1, H and halves.
    choices = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    cases.append(
        dict(
            name="border",
            x=rand(2, 4, 4, 5),
            offset=choices[torch.randint(0, 6, (2, 2 * 2 * 9, 4, 5), generator=g)],
            mask=torch.rand(2, 2 * 9, 4, 5, generator=g, dtype=torch.float64),
            weight=rand(2, 4, 3, 3),
            bias=rand(2),
            geometry=((1, 1), (1, 1), (1, 1), 1, 2),
            integer_points=True,
        )
    )
    return cases


def _run_backend(backend, case, mask, dtype, device, grad_out):
    from ..layers import modulated_deform_conv

    stride, padding, dilation, groups, dg = case["geometry"]
    names = ["input", "offset"] + (["mask"] if mask is not None else []) + ["weight", "bias"]
    sources = {"input": case["x"], "offset": case["offset"], "mask": mask}
    sources.update(weight=case["weight"], bias=case["bias"])
    leaves = {k: sources[k].to(device, dtype).requires_grad_() for k in names}
    out = modulated_deform_conv(
        leaves["input"],
        leaves["offset"],
        leaves.get("mask"),
        leaves["weight"],
        leaves["bias"],
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        deformable_groups=dg,
        backend=backend,
    )
    grads = torch.autograd.grad(out, [leaves[k] for k in names], grad_out.to(device, dtype))
    result = {"out": out.detach()}
    result.update({k: v.detach() for k, v in zip(names, grads)})
    return result


def check_exactness(ctx: Dict) -> Dict:
    from ..layers import available_backends

    device, quick = ctx["device"], ctx["quick"]
    dtypes = [torch.float64, torch.float32]
    rows = []
    for case in _exactness_cases(quick):
        for modulated in (True, False):
            mask = case["mask"] if modulated else None
            stride, padding, dilation, groups, dg = case["geometry"]
            with torch.no_grad():
                ho, wo = case["offset"].shape[2:]
            g = torch.Generator().manual_seed(1)
            grad_out = torch.randn(
                case["x"].shape[0],
                case["weight"].shape[0],
                ho,
                wo,
                generator=g,
                dtype=torch.float64,
            )
            expected = _reference.deform_conv_reference(
                case["x"], case["offset"], mask, case["weight"], case["bias"], grad_out,
                stride, padding, dilation, groups, dg,
            )  # fmt: skip
            for backend in available_backends(device):
                for dtype in dtypes:
                    label = dict(
                        case=case["name"], modulated=modulated, backend=backend, dtype=str(dtype)
                    )
                    try:
                        got = _run_backend(backend, case, mask, dtype, device, grad_out)
                    except Exception as e:  # a backend that cannot run this call: a failure
                        rows.append(dict(label, tensor="*", ok=False, gating=True, error=repr(e)))
                        continue
                    for name, value in got.items():
                        want = expected[name]
                        err = (value.double().cpu() - want).abs().max().item()
                        scale = max(want.abs().max().item(), 1e-12)
                        tol = TOLERANCES[dtype]
                        ok = math.isfinite(err) and err <= tol * scale
                        # torchvision's offset/mask gradient at points exactly on integers is
                        # not detectron2's (tests/layers/test_native.py): informational only.
                        known = backend == "torchvision" and case["integer_points"]
                        gating = not (known and name in ("offset", "mask"))
                        rows.append(
                            dict(label, tensor=name, max_abs=err, max_rel=err / scale,
                                 tol=tol, ok=ok, gating=gating)
                        )  # fmt: skip
    failures = [r for r in rows if r["gating"] and not r["ok"]]
    return {"rows": rows, "failures": len(failures), "passed": not failures}


# --- speed -------------------------------------------------------------------------------------

SPEED_SHAPES = {"res3": (128, 100, 152), "res4": (256, 50, 76), "res5": (512, 25, 38)}
QUICK_SPEED_SHAPES = {"tiny": (8, 12, 10)}


def _timed(fn: Callable[[], None], device, warmup: int, repeats: int, cap: float) -> List[float]:
    """Seconds of up to ``repeats`` runs after up to ``warmup``; stops once ``cap`` s are spent."""
    spent, times = 0.0, []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1000
        else:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        spent += dt
        if i >= warmup or spent > cap:
            times.append(dt)
        if spent > cap and times:
            break
    return times


def _peak_mib(fn: Callable[[], None], device) -> Optional[float]:
    """Peak CUDA memory allocated by ``fn`` above what was allocated before, in MiB."""
    if device.type != "cuda":
        return None
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _speed_case(method, shape, batch, precision, device, warmup, repeats, cap) -> Dict:
    from ..layers import modulated_deform_conv

    c, h, w = shape
    g = torch.Generator(device="cpu").manual_seed(0)

    def make(*size, scale=1.0, positive=False):
        t = torch.rand(*size, generator=g) if positive else torch.randn(*size, generator=g)
        return (t * scale).to(device).requires_grad_()

    x = make(batch, c, h, w)
    weight, bias = make(c, c, 3, 3, scale=0.01), make(c, scale=0.1)
    offset, mask = make(batch, 18, h, w, scale=2.0), make(batch, 9, h, w, positive=True)
    leaves = (x, weight, bias, offset, mask)
    autocast = torch.autocast(device.type, dtype=precision, enabled=precision != torch.float32)

    def forward():
        with autocast:
            if method == "conv2d":
                return F.conv2d(x, weight, bias, padding=1)
            return modulated_deform_conv(x, offset, mask, weight, bias, padding=1, backend=method)

    def fwd():
        with torch.no_grad():
            forward()

    def fwd_bwd():
        forward().float().sum().backward()
        for t in leaves:
            t.grad = None

    row = {}
    for mode, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        row[f"{mode}_peak_mib"] = _peak_mib(fn, device)
        times = _timed(fn, device, warmup, repeats, cap)
        row[f"{mode}_ms"] = statistics.median(times) * 1000
        row[f"{mode}_runs"] = len(times)
    return row


def check_speed(ctx: Dict) -> Dict:
    from ..layers import available_backends

    device, quick, clock = ctx["device"], ctx["quick"], ctx["clock"]
    shapes = QUICK_SPEED_SHAPES if quick else SPEED_SHAPES
    batches = (2,) if quick else (2, 8)
    if device.type == "cuda":
        precisions = [torch.float32, torch.float16, torch.bfloat16]
    else:
        precisions = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    warmup, repeats, cap = (1, 2, 0.5) if quick else (3, 10, 1.5)
    methods = ["conv2d"] + available_backends(device)
    plan = [
        (p, s, b, m) for p in precisions for s in shapes for b in batches for m in methods
    ]  # float32 first: the most important numbers survive a budget cut
    rows, skipped = [], 0
    for precision, shape, batch, method in plan:
        row = dict(shape=shape, size=list(shapes[shape]), batch=batch,
                   precision=str(precision).replace("torch.", ""), method=method)  # fmt: skip
        if clock.left() < 2 * cap:
            skipped += 1
            continue
        try:
            row.update(_speed_case(method, shapes[shape], batch, precision, device,
                                   warmup, repeats, cap))  # fmt: skip
        except Exception as e:  # out of memory, a backend refusing a dtype: record and go on
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return {"rows": rows, "skipped_for_time": skipped, "warmup": warmup, "repeats": repeats,
            "cap_s": cap}  # fmt: skip


# --- model -------------------------------------------------------------------------------------


def _work_dataset(ctx: Dict) -> str:
    """A synthetic training split registered under the run's work folder; returns its name."""
    from detectron2.data import DatasetCatalog

    from ..data.synthetic import SPLITS, register_synthetic_dataset

    num_images, seed = (8, 0) if ctx["quick"] else SPLITS["train"]
    name = f"gpu_check_synthetic_train_{num_images}"
    if name not in DatasetCatalog.list():
        root = os.path.join(ctx["work_dir"], "datasets")
        register_synthetic_dataset(name, root, "train", num_images, seed)
    return name


def _model_cfg(ctx: Dict, backend: str, amp: bool, dataset: str):
    from .. import get_cfg

    opts = [
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", str(ctx["device"]),
        "MODEL.DCNV2.BACKEND", backend, "SOLVER.AMP.ENABLED", str(amp),
        "DATASETS.TRAIN", f"('{dataset}',)", "DATASETS.TEST", "()",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.005", "SOLVER.WARMUP_ITERS", "10",
        "SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "5.0", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
        "DATALOADER.NUM_WORKERS", "0" if ctx["quick"] else "4", "SEED", "0",
        "OUTPUT_DIR", os.path.join(ctx["work_dir"], "model_output"),
    ]  # fmt: skip
    if ctx["quick"]:
        opts += QUICK_MODEL_OPTS
    return get_cfg(SEED_CONFIG, opts)


def _train_iterations(cfg, iters: int, clock: _Clock, wrap: Optional[Callable] = None) -> Dict:
    """``iters`` steps of detectron2's SimpleTrainer (the project's AMP trainer with
    ``SOLVER.AMP.ENABLED``) on ``cfg``; times, peak memory and the total losses."""
    from detectron2.engine import SimpleTrainer
    from detectron2.utils.events import EventStorage

    from ..engine import Trainer
    from ..engine.amp import amp_trainer

    device = torch.device(cfg.MODEL.DEVICE)
    model = Trainer.build_model(cfg)
    optimizer = Trainer.build_optimizer(cfg, model)
    if wrap is not None:
        model = wrap(model)
    loader = Trainer.build_train_loader(cfg)
    loop = (amp_trainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, loader, optimizer)
    times, losses = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with EventStorage(0) as storage:
        loop.storage = storage
        for it in range(iters):
            if it >= 2 and clock.left() < 5:
                break
            loop.iter = storage.iter = it
            _sync(device)
            t0 = time.perf_counter()
            loop.run_step()
            _sync(device)
            times.append(time.perf_counter() - t0)
            losses.append(storage.history("total_loss").latest())
    steady = times[len(times) // 2 :] if len(times) > 2 else times
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "iters": len(times),
        "s_per_iter": statistics.median(steady),
        "first_iter_s": times[0],
        "peak_mib": peak,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses_finite": all(math.isfinite(v) for v in losses),
        "model": model,
    }


def _inference(model, ctx: Dict) -> Dict:
    device, clock = ctx["device"], ctx["clock"]
    h, w = (64, 96) if ctx["quick"] else (800, 1216)
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, h, w), generator=g).float()
    inputs = [{"image": image, "height": h, "width": w}]
    model.eval()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        for i in range(2 + (2 if ctx["quick"] else 10)):
            if i >= 3 and clock.left() < 3:
                break
            _sync(device)
            t0 = time.perf_counter()
            model(inputs)
            _sync(device)
            times.append(time.perf_counter() - t0)
    timed = times[2:] or times
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"size": [h, w], "s_per_image": statistics.median(timed), "runs": len(timed),
            "peak_mib": peak}  # fmt: skip


def check_model(ctx: Dict) -> Dict:
    from ..layers import available_backends

    device, clock = ctx["device"], ctx["clock"]
    dataset = _work_dataset(ctx)
    iters = 2 if ctx["quick"] else 20
    backends = available_backends(device)
    # --quick: one backend; on CPU no AMP run either (bfloat16 autocast is slow on CPUs).
    amps = (False,) if ctx["quick"] and device.type == "cpu" else (False, True)
    if ctx["quick"]:
        backends = backends[:1]
    train_rows, infer_rows, problems = [], [], []
    for backend in backends:
        for amp in amps:
            row = {"backend": backend, "amp": amp}
            if clock.left() < 10:
                row["skipped"] = "time budget spent"
                train_rows.append(row)
                continue
            try:
                result = _train_iterations(_model_cfg(ctx, backend, amp, dataset), iters, clock)
                model = result.pop("model")
                row.update(result)
                if not row["losses_finite"]:
                    problems.append(f"{backend} amp={amp}: non-finite loss")
                if not amp:
                    infer_rows.append(dict(backend=backend, **_inference(model, ctx)))
                del model
            except Exception:
                row["error"] = traceback.format_exc(limit=-6)
                problems.append(f"{backend} amp={amp}: {row['error'].strip().splitlines()[-1]}")
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            train_rows.append(row)
    return {"train": train_rows, "inference": infer_rows, "problems": problems,
            "passed": not problems}  # fmt: skip


# --- eval through train_net.py -----------------------------------------------------------------


def _child_env(ctx: Dict) -> Dict[str, str]:
    """The environment of a child process: this package importable, data under the work dir."""
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)
    datasets = os.path.join(ctx["work_dir"], "datasets")
    return dict(os.environ, PYTHONPATH=path, DETECTRON2_DATASETS=datasets)


def check_eval(ctx: Dict) -> Dict:
    train_net = os.path.join(REPO, "train_net.py")
    if not os.path.isfile(train_net):
        raise FileNotFoundError(f"{train_net} (the eval section needs a repository checkout)")
    device = ctx["device"]
    # The seed config, random init, on the synthetic val split (its DATASETS.TEST is COCO's).
    opts = ["MODEL.DEVICE", str(device), "MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
            "DATASETS.TEST", "('dcnv2_synthetic_val',)", "DATASETS.TRAIN", "()",
            "OUTPUT_DIR", os.path.join(ctx["work_dir"], "eval_output"), "DATALOADER.NUM_WORKERS",
            "0" if ctx["quick"] else "4"]  # fmt: skip
    if ctx["quick"]:
        opts += QUICK_MODEL_OPTS
    cmd = [sys.executable, train_net, "--eval-only", "--config-file",
           os.path.join(REPO, "configs", SEED_CONFIG), *opts]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=REPO, env=_child_env(ctx), capture_output=True, text=True,
        timeout=max(ctx["clock"].left(), 5),
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    result = {"returncode": proc.returncode, "seconds": time.perf_counter() - t0,
              "command": " ".join(cmd[1:]), "passed": proc.returncode == 0}  # fmt: skip
    result["results"] = [ln for ln in output.splitlines() if "copypaste:" in ln][-3:]
    result["tail"] = output[-3000:]
    return result


# --- DDP ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(config: Dict) -> Dict:
    """In a fresh process: an NCCL (gloo on CPU) group of world size 1, then training
    iterations of the seed model wrapped in DistributedDataParallel."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(config["device"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)  # "cuda" without an index is refused here
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{_free_port()}", world_size=1, rank=0
    )
    try:
        probe = torch.ones(4, device=device)
        dist.all_reduce(probe)
        ctx = dict(config, device=device, clock=_Clock(config["budget"]))
        cfg = _model_cfg(ctx, "auto", False, _work_dataset(ctx))
        ids = [device.index or 0] if device.type == "cuda" else None

        def wrap(model):
            return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

        result = _train_iterations(cfg, config["iters"], ctx["clock"], wrap=wrap)
        result["wrapped"] = type(result.pop("model")).__name__
        result.update(process_group=dist.get_backend(), world_size=dist.get_world_size(),
                      all_reduce_ok=bool((probe == 1).all()))  # fmt: skip
        return result
    finally:
        dist.destroy_process_group()


def check_ddp(ctx: Dict) -> Dict:
    config = {
        "device": str(ctx["device"]),
        "quick": ctx["quick"],
        "work_dir": ctx["work_dir"],
        "iters": 2 if ctx["quick"] else 5,
        "budget": max(ctx["clock"].left() - 5, 5),
    }
    code = (
        "import json, sys; from dcnv2.tools.gpu_check import ddp_worker; "
        "print('GPU_CHECK_RESULT ' + json.dumps(ddp_worker(json.loads(sys.argv[1]))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(config)], env=_child_env(ctx), cwd=REPO,
        capture_output=True, text=True, timeout=max(ctx["clock"].left(), 5),
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("GPU_CHECK_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"DDP worker exited with {proc.returncode}:\n{output[-4000:]}")
    result = json.loads(lines[-1].split(" ", 1)[1])
    result["passed"] = result["losses_finite"] and result["all_reduce_ok"]
    return result


# --- the run and its report --------------------------------------------------------------------

_CHECKS = {
    "environment": check_environment,
    "exactness": check_exactness,
    "speed": check_speed,
    "model": check_model,
    "eval": check_eval,
    "ddp": check_ddp,
}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3f}".rstrip("0").rstrip(".")
    return str(v).replace("|", "/").replace("\n", " ")


def _table(headers: Sequence[str], rows: Sequence[Sequence]) -> List[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _exactness_md(data: Dict) -> List[str]:
    backends = list(dict.fromkeys(r["backend"] for r in data["rows"]))
    cells: Dict[tuple, Dict[str, str]] = {}
    for r in data["rows"]:
        key = (r["case"], "DCNv2" if r["modulated"] else "DCNv1", r["dtype"].replace("torch.", ""),
               r["tensor"])  # fmt: skip
        if "error" in r:
            text = "ERROR " + r["error"][:80]
        else:
            mark = "ok" if r["ok"] else ("FAIL" if r["gating"] else "differs (known)")
            text = f"{r['max_rel']:.1e} {mark}"
        cells.setdefault(key, {})[r["backend"]] = text
    rows = [list(k) + [c.get(b, "-") for b in backends] for k, c in cells.items()]
    tol32 = _fmt(TOLERANCES[torch.float32])
    lines = [f"Max abs error / max abs reference value; tolerance {tol32} "
             f"(float32), {_fmt(TOLERANCES[torch.float64])} (float64). Gating failures: "
             f"{data['failures']}.", ""]  # fmt: skip
    return lines + _table(["case", "op", "dtype", "tensor"] + backends, rows)


def _speed_md(data: Dict) -> List[str]:
    rows = []
    for r in data["rows"]:
        rows.append([r["shape"], r["batch"], r["precision"], r["method"], r.get("fwd_ms"),
                     r.get("fwd_bwd_ms"), r.get("fwd_peak_mib"), r.get("fwd_bwd_peak_mib"),
                     r.get("error", "")])  # fmt: skip
    head = [f"Median of up to {data['repeats']} runs after {data['warmup']} warm-up runs, at most "
            f"{data['cap_s']} s per measurement; peak = max allocated above the inputs. Skipped "
            f"for time: {data['skipped_for_time']}.", ""]  # fmt: skip
    return head + _table(["shape", "batch", "precision", "method", "fwd ms", "fwd+bwd ms",
                          "fwd peak MiB", "fwd+bwd peak MiB", "error"], rows)  # fmt: skip


def _model_md(data: Dict) -> List[str]:
    train = [[r["backend"], r["amp"], r.get("iters"), r.get("s_per_iter"), r.get("first_iter_s"),
              r.get("peak_mib"), r.get("loss_first"), r.get("loss_last"), r.get("losses_finite"),
              (r.get("error") or r.get("skipped") or "").strip().splitlines()[-1:] or ""]
             for r in data["train"]]  # fmt: skip
    infer = [[r["backend"], "x".join(map(str, r["size"])), r["s_per_image"], r["runs"],
              r["peak_mib"]] for r in data["inference"]]  # fmt: skip
    return (
        ["Training (2 images per iteration; s/iter = median of the second half):", ""]
        + _table(["backend", "AMP", "iters", "s/iter", "first iter s", "peak MiB", "loss first",
                  "loss last", "finite", "error"], train)  # fmt: skip
        + ["Inference (batch 1, no_grad):", ""]
        + _table(["backend", "size", "s/image", "runs", "peak MiB"], infer)
    )


def _kv_md(data: Dict) -> List[str]:
    rows = [[k, v] for k, v in data.items() if k not in ("tail", "rows")]
    lines = _table(["key", "value"], rows)
    if data.get("tail"):
        lines += ["```", data["tail"][-1500:], "```", ""]
    return lines


def format_markdown(report: Dict) -> str:
    """The report as Markdown: the machine first, then one table per section."""
    env = report["sections"].get("environment", {}).get("data", {})
    lines = ["# dcnv2 GPU check", ""]
    lines += _table(["GPU", "driver", "torch", "CUDA", "cuDNN", "torchvision", "detectron2",
                     "detectron2 _C", "backends"],
                    [[env.get("gpu", env.get("device")), env.get("driver"), env.get("torch"),
                      env.get("torch_cuda"), env.get("cudnn"), env.get("torchvision"),
                      env.get("detectron2"), env.get("detectron2_C"),
                      ", ".join(env.get("backends", []))]])  # fmt: skip
    lines += [f"Exit status: {report.get('exit_status')}; options: {report['options']}", ""]
    writers = {"exactness": _exactness_md, "speed": _speed_md, "model": _model_md}
    for name, section in report["sections"].items():
        lines += [f"## {name}: {section['status']} ({section.get('seconds', 0):.1f} s)", ""]
        if section.get("error"):
            lines += ["```", section["error"][-3000:], "```", ""]
        if section.get("data"):
            lines += writers.get(name, _kv_md)(section["data"])
    return "\n".join(lines) + "\n"


def _write(report: Dict, out_dir: str) -> None:
    for name, text in (
        ("gpu_check.json", json.dumps(report, indent=1, default=str)),
        ("gpu_check.md", format_markdown(report)),
    ):
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))


def _exit_status(report: Dict) -> int:
    exact = report["sections"].get("exactness")
    if exact is not None and exact["status"] != "ok":  # failed, crashed or skipped for time
        return 1
    if any(s["status"] in ("failed", "error") for s in report["sections"].values()):
        return 3
    return 0


def run_check(
    out_dir: str,
    device: str = "cuda",
    quick: bool = False,
    time_budget: float = 480.0,
    sections: Sequence[str] = SECTIONS,
    work_dir: Optional[str] = None,
) -> int:
    """Run the selected sections, rewriting ``out_dir``/gpu_check.{json,md} after each.

    Returns:
        The exit status (see the module docstring).
    """
    os.makedirs(out_dir, exist_ok=True)
    work_dir = work_dir or tempfile.mkdtemp(prefix="dcnv2_gpu_check_")
    clock = _Clock(time_budget)
    ctx = {"device": torch.device(device), "quick": quick, "clock": clock, "work_dir": work_dir}
    report = {
        "options": {"device": device, "quick": quick, "time_budget": time_budget,
                    "sections": list(sections)},  # fmt: skip
        "sections": {},
    }
    for i, name in enumerate(SECTIONS):
        if name not in sections:
            continue
        later = sum(_MIN_LEFT[n] for n in SECTIONS[i + 1 :] if n in sections)
        now = time.monotonic()
        # --quick runs are bounded by the budget alone: their sections are small but a busy
        # CPU can be slow.
        cap = math.inf if quick else _CAPS[name]
        clock.section_end = min(now + cap, clock.end - later)
        if clock.end - now < _MIN_LEFT[name]:
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
            report["sections"][name]["seconds"] = time.perf_counter() - start
            print(f"[gpu_check] {name}: {report['sections'][name]['status']}", flush=True)
        report["exit_status"] = _exit_status(report)
        _write(report, out_dir)
    report["exit_status"] = _exit_status(report)
    _write(report, out_dir)
    return report["exit_status"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import tool_parser

    parser = tool_parser(__doc__, skip=1)
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 iterations")
    parser.add_argument("--time-budget", type=float, default=480.0, metavar="SECONDS")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--work-dir", help="scratch folder (synthetic data, outputs)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: no CUDA device is visible to torch here")
    status = run_check(args.out, args.device, args.quick, args.time_budget, args.sections,
                       args.work_dir)  # fmt: skip
    print(f"[gpu_check] report: {os.path.join(args.out, 'gpu_check.md')}; exit status {status}")
    return status
