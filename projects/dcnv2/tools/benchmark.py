"""Model-level speed and memory of detectors built from configs (``tools/benchmark.py``).

Random weights with equal work in the heads (:func:`equal_work_heads`); each (config, mode) runs
in its own worker process, the configs of a mode in interleaved rounds (:mod:`.timing`).
"""

import contextlib
import os
from typing import Dict, List, Sequence

import torch
from detectron2.modeling import build_model
from tqdm import tqdm

from ..config import get_cfg
from ..errors import UserInputError
from ..layers.backends import resolve_backend
from ..model_zoo import resolve_config_file
from .timing import (
    PeakMemory,
    StepWorker,
    detection_batch,
    interleaved_times,
    serve_steps,
    summarize,
    text_table,
    training_step,
    worker_main,
)

MODES = ("inference", "train")


def equal_work_heads(model: torch.nn.Module) -> torch.nn.Module:
    """Zeroes the last layers of the RPN head and box predictors; returns ``model``.

    Every model then gets the same proposals and scores every class below the test threshold, so
    random weights do not make the NMS cost vary wildly from model to model.
    """
    head = model.proposal_generator.rpn_head
    layers = [head.objectness_logits, head.anchor_deltas]
    layers += [
        m
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in ("cls_score", "bbox_pred") and isinstance(m, torch.nn.Linear)
    ]
    for layer in layers:
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    return model


def model_steps(config, opts=(), device="cpu", size=(800, 1216), batch_size=2, amp=False, seed=0):
    """A model of ``config`` (random weights, :func:`equal_work_heads`) and ``make_step(mode)``,
    a function without arguments: one training iteration on a fixed batch ("train") or inference
    of one image ("inference"), under AMP if ``amp``. Returns (cfg, model, make_step)."""
    cfg = get_cfg(config, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", str(device), *opts])
    torch.manual_seed(seed)
    model = equal_work_heads(build_model(cfg))
    device = torch.device(device)

    def make_step(mode):
        if mode == "train":
            classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
            batch = detection_batch(
                batch_size, *size, boxes_per_image=3, num_classes=classes, seed=seed
            )
            # lr 0: random weights (frozen-BN ResNet) would diverge within a few real steps.
            return training_step(model, batch, amp=amp)
        image = detection_batch(1, *size, seed=seed)
        half = torch.float16 if device.type == "cuda" else torch.bfloat16

        def infer():
            model.eval()
            with torch.no_grad(), torch.autocast(device.type, half, enabled=amp):
                model(image)
            model.train()

        return infer

    return cfg, model, make_step


def run_worker(spec: Dict) -> Dict:
    """Build one model and serve timed runs of ``spec["mode"]`` to a :class:`.timing.StepWorker`;
    returns its memory (MiB), load average and backend."""
    mode = spec["mode"]
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    size = (spec["height"], spec["width"])
    cfg, model, make_step = model_steps(
        spec["config"], spec["opts"], "cpu", size, spec["batch_size"], seed=spec["seed"]
    )
    backend = resolve_backend(cfg.MODEL.DCNV2.BACKEND, torch.device("cpu"))
    deformable = any(getattr(m, "deformable_groups", None) for m in model.modules())
    load_before = os.getloadavg()[0]
    with PeakMemory() as memory:
        serve_steps({"run": make_step(mode)})
    return {
        "config": spec["config"],
        "mode": mode,
        "backend": backend if deformable else "-",
        "peak_rss_mib": None if memory.peak_mib is None else round(memory.peak_mib, 1),
        "peak_rss_is_run_only": memory.run_only,
        "rss_build_mib": None if memory.start_mib is None else round(memory.start_mib, 1),
        "threads": torch.get_num_threads(),
        # Above the core count, other processes competed for the CPU: the times are inflated.
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
    """Time every (config, mode) in its own worker, the configs of a mode in interleaved rounds.

    Returns:
        list[dict]: per (config, mode), :func:`run_worker`'s result, ``times_s`` and their
        :func:`.timing.summarize`.
    """
    unknown = set(modes) - set(MODES)
    if unknown:
        raise UserInputError(f"unknown mode(s) {sorted(unknown)}; expected some of {list(MODES)}")
    if repeats < 1 or warmup < 0 or batch_size < 1 or min(height, width) < 32:
        raise UserInputError(
            "need --repeats >= 1, --warmup >= 0, --batch-size >= 1 and images of at least 32x32"
        )
    for config in configs:
        resolve_config_file(config)  # a missing one: ConfigFileNotFoundError, a user error
    common = dict(opts=list(opts), height=height, width=width, batch_size=batch_size, seed=seed)
    results = {}
    rounds = len(modes) * (warmup + repeats)
    with tqdm(total=rounds, desc="benchmark", unit="round", disable=not progress) as bar:
        for mode in modes:
            with contextlib.ExitStack() as stack:
                workers = {
                    i: stack.enter_context(
                        StepWorker(__name__, dict(common, config=c, mode=mode), f"{c} ({mode})")
                    )
                    for i, c in enumerate(configs)
                }
                times = interleaved_times(workers, ("run",), repeats, warmup, bar.update)
                for i, worker in workers.items():
                    run = times[i]["run"]
                    results[i, mode] = dict(worker.finish(), times_s=run, **summarize(run))
    return [results[i, mode] for i in range(len(configs)) for mode in modes]


def format_table(results: Sequence[Dict]) -> str:
    """A Markdown table: time, ratio to the first config, peak memory and load average."""
    first: Dict[str, float] = {}
    for r in results:
        first.setdefault(r["mode"], r["median_s"])
    header = ["config", "backend", "mode", "median s", "IQR s", "ratio", "peak RSS MiB", "runs",
              "load"]  # fmt: skip
    rows = [
        [
            r["config"],
            r["backend"],
            r["mode"],
            f"{r['median_s']:.3f}",
            f"{r['iqr_s']:.3f}",
            f"{r['median_s'] / first[r['mode']]:.2f}x",
            "n/a" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}",
            len(r["times_s"]),
            f"{max(r['loadavg']):.1f}",
        ]
        for r in results
    ]
    return text_table(header, rows)


if __name__ == "__main__":
    worker_main(run_worker)
