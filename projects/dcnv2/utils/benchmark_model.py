"""Model-level speed and memory of detectors built from configs: inference at the test
resolution and training iterations, the logic of ``tools/benchmark.py``.

Method (also printed by the tool):
    * Random-init weights (``MODEL.WEIGHTS ""``), fixed random images of the given size.
    * The last layers of the RPN head and of the box predictor are zeroed: every model then
      proposes the anchors with equal scores, gets the same number of proposals
      (``POST_NMS_TOPK_TEST`` at inference) and scores every class 1/(K+1), below the test
      threshold, so no model pays for a final NMS. With random weights the proposal count and
      the number of boxes above the threshold (and so the NMS cost, which can dominate) vary
      wildly from model to model; a trained model's final NMS is cheap.
    * Inference: batch of 1 under ``torch.no_grad()``. Training: forward, backward and an SGD
      step (learning rate 0, same cost) on a batch of ``batch_size`` images with 3 random boxes
      each, the stem and res2 frozen as in the recipes (``FREEZE_AT 2``).
    * ``warmup`` untimed runs, then the median of ``repeats`` timed ones.
    * Memory: every (config, mode) runs in a fresh Python process; its peak resident set size
      (Linux ``VmHWM``) is reset after the model is built (``/proc/self/clear_refs``) and read
      after the runs, so it measures the runs' peak, weights and libraries included, not the
      build. ``rss_build_mib`` is the resident size after building.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from .cli import UserInputError

__all__ = ["MODES", "run_worker", "benchmark", "format_table"]

MODES = ("inference", "train")


def _read_status(field: str) -> Optional[int]:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in KiB (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _images(batch: int, height: int, width: int, seed: int) -> List[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (3, height, width), generator=generator).float() for _ in range(batch)
    ]


def _train_batch(images: List[torch.Tensor], num_classes: int, seed: int) -> List[Dict]:
    from detectron2.structures import Boxes, Instances

    generator = torch.Generator().manual_seed(seed + 1)
    batch = []
    for image in images:
        h, w = image.shape[1:]
        xy = torch.rand(3, 2, generator=generator) * torch.tensor([w * 0.6, h * 0.6])
        wh = (0.1 + 0.3 * torch.rand(3, 2, generator=generator)) * torch.tensor([w, h])
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        instances.gt_classes = torch.randint(0, num_classes, (3,), generator=generator)
        batch.append({"image": image, "height": h, "width": w, "instances": instances})
    return batch


def run_worker(spec: Dict) -> Dict:
    """Build one model and time one mode, in this process. ``spec`` holds ``config``,
    ``opts``, ``mode``, ``height``, ``width``, ``batch_size``, ``warmup``, ``repeats``,
    ``seed``. Returns times (seconds), memory (MiB) and the deformable-conv backend used."""
    from detectron2.modeling import build_model
    from torch import nn

    from ..config import get_cfg
    from ..layers.backends import resolve_backend

    cfg = get_cfg(spec["config"], ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *spec["opts"]])
    torch.manual_seed(spec["seed"])
    model = build_model(cfg)
    # Equal work in the heads whatever the random backbone outputs (see the module docstring).
    head = model.proposal_generator.rpn_head
    predictors = [head.objectness_logits, head.anchor_deltas]
    predictors += [
        m
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in ("cls_score", "bbox_pred") and isinstance(m, nn.Linear)
    ]
    for layer in predictors:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    backend = resolve_backend(cfg.MODEL.DCNV2.BACKEND, torch.device("cpu"))
    deformable = any(getattr(m, "deformable_groups", None) for m in model.modules())
    load_before = os.getloadavg()[0]
    peak_reset = _reset_peak_rss()
    # Read after the reset: the high-water mark then bounds it from above (the allocator may
    # hand pages back between a read before the reset and the reset itself).
    rss_build = _read_status("VmRSS")
    mode = spec["mode"]
    if mode == "inference":
        model.eval()
        inputs = [
            {"image": image, "height": image.shape[1], "width": image.shape[2]}
            for image in _images(1, spec["height"], spec["width"], spec["seed"])
        ]

        def step():
            with torch.no_grad():
                model(inputs)

    elif mode == "train":
        model.train()
        images = _images(spec["batch_size"], spec["height"], spec["width"], spec["seed"])
        batch = _train_batch(images, cfg.MODEL.ROI_HEADS.NUM_CLASSES, spec["seed"])
        params = [p for p in model.parameters() if p.requires_grad]
        # lr 0: the step costs the same, and random weights (no normalisation in a frozen-BN
        # ResNet) diverge to Inf within a few real steps, which detectron2 then refuses.
        optimizer = torch.optim.SGD(params, lr=0.0, momentum=0.9)

        def step():
            losses = model(batch)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()

    else:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    from detectron2.utils.events import EventStorage

    times = []
    with EventStorage(0):  # training-mode detectron2 models log to the current storage
        for i in range(spec["warmup"] + spec["repeats"]):
            start = time.perf_counter()
            step()
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - start)
    peak = _read_status("VmHWM")
    if peak is not None and rss_build is not None:
        # The kernel's RSS counters are batched per CPU, so a later high-water mark can read a
        # few pages below an earlier RSS (seen: 2319.2 vs 2319.3 MiB); the run's peak is at
        # least the size it started at.
        peak = max(peak, rss_build)
    return {
        "config": spec["config"],
        "mode": mode,
        "backend": backend if deformable else "-",
        "median_s": statistics.median(times),
        "times_s": times,
        "peak_rss_mib": None if peak is None else round(peak / 1024, 1),
        "peak_rss_is_run_only": peak_reset,
        "rss_build_mib": None if rss_build is None else round(rss_build / 1024, 1),
        "threads": torch.get_num_threads(),
        # 1-minute load average before and after the runs: above the core count, other
        # processes competed for the CPU and the times are inflated.
        "loadavg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
    }


def benchmark(
    configs: Sequence[str],
    modes: Sequence[str] = MODES,
    height: int = 800,
    width: int = 1216,
    batch_size: int = 2,
    warmup: int = 1,
    repeats: int = 5,
    opts: Sequence[str] = (),
    seed: int = 0,
    progress: bool = True,
) -> List[Dict]:
    """Run every (config, mode) in a fresh subprocess (see the module docstring).

    Returns:
        list[dict]: one result of :func:`run_worker` per (config, mode), configs outermost.

    Raises:
        UserInputError: bad arguments, or a worker failed (its last error line is quoted).
    """
    from tqdm import tqdm

    from ..model_zoo import get_config_file

    unknown = set(modes) - set(MODES)
    if unknown:
        raise UserInputError(f"unknown mode(s) {sorted(unknown)}; expected some of {list(MODES)}")
    if repeats < 1 or warmup < 0 or batch_size < 1 or min(height, width) < 32:
        raise UserInputError(
            "need --repeats >= 1, --warmup >= 0, --batch-size >= 1 and images of at least 32x32"
        )
    for config in configs:
        if not os.path.isfile(config):
            try:
                get_config_file(config)
            except FileNotFoundError as e:
                raise UserInputError(str(e)) from None
    jobs = [(config, mode) for config in configs for mode in modes]
    results = []
    for config, mode in tqdm(jobs, desc="benchmark", unit="run", disable=not progress):
        spec = dict(
            config=config,
            opts=list(opts),
            mode=mode,
            height=height,
            width=width,
            batch_size=batch_size,
            warmup=warmup,
            repeats=repeats,
            seed=seed,
        )
        proc = subprocess.run(
            [sys.executable, "-m", "dcnv2.utils.benchmark_model", json.dumps(spec)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            raise UserInputError(
                f"benchmark of {config} ({mode}) failed: {lines[-1] if lines else proc.returncode}"
            )
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def format_table(results: Sequence[Dict]) -> str:
    """A Markdown table: time, ratio to the first config and peak memory per config and mode,
    with the load average seen by each run (above the core count, the times are inflated)."""
    first: Dict[str, float] = {}
    for r in results:
        first.setdefault(r["mode"], r["median_s"])
    header = "| config | backend | mode | median s | ratio | peak RSS MiB | runs | load |"
    lines = [header, "|" + "---|" * 8]
    for r in results:
        ratio = r["median_s"] / first[r["mode"]]
        peak = "n/a" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"
        lines.append(
            f"| {r['config']} | {r['backend']} | {r['mode']} | {r['median_s']:.3f} | "
            f"{ratio:.2f}x | {peak} | {len(r['times_s'])} | {max(r['loadavg']):.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    # Worker entry point: one JSON spec in argv, one JSON result on the last line of stdout.
    import warnings

    warnings.filterwarnings("ignore")
    print(json.dumps(run_worker(json.loads(sys.argv[1]))))
