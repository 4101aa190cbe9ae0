"""The one timing harness of the benchmarks and the GPU check: steps timed with
torch.utils.benchmark's clock in interleaved rounds across workers, so that ratios hold when the
host's speed drifts; medians and IQR by ``torch.utils.benchmark.Measurement``.
"""

import itertools
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.benchmark import Measurement
from torch.utils.benchmark.utils.common import TaskSpec
from torch.utils.benchmark.utils.timer import timer

from ..errors import UserInputError

__all__ = [
    "InProcessSteps",
    "PeakMemory",
    "StepWorker",
    "count_syncs",
    "detection_batch",
    "interleaved_times",
    "run_in_fresh_process",
    "serve_steps",
    "summarize",
    "text_table",
    "time_call",
    "training_step",
    "worker_main",
]


def detection_batch(
    num_images: int,
    height: int,
    width: int,
    *,
    boxes_per_image: int = 0,
    num_classes: int = 80,
    seed: int = 0,
) -> List[Dict[str, Any]]:
    """A fixed random batch in detectron2's format: (3, height, width) float images of integers
    in [0, 255], with ``boxes_per_image`` random ground-truth ``"instances"`` for training."""
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(num_images):
        image = torch.randint(0, 256, (3, height, width), generator=g).float()
        item = {"image": image, "height": height, "width": width}
        if boxes_per_image:
            k = boxes_per_image
            xy = torch.rand(k, 2, generator=g) * torch.tensor([width - 16.0, height - 16.0])
            room = torch.tensor([width, height]) - 16 - xy  # the box stays inside the image
            wh = 16 + torch.rand(k, 2, generator=g) * room * 0.9
            instances = Instances((height, width), gt_boxes=Boxes(torch.cat([xy, xy + wh], 1)))
            instances.gt_classes = torch.randint(0, num_classes, (k,), generator=g)
            item["instances"] = instances
        batch.append(item)
    return batch


def training_step(
    model: torch.nn.Module,
    batch: List[Dict[str, Any]],
    *,
    amp: bool = False,
    lr: float = 0.0,
    momentum: float = 0.9,
) -> Callable[[], None]:
    """One iteration of :func:`dcnv2.engine.trainer.build_training_loop` on ``batch`` per call.

    lr 0 costs the same as a real step and keeps random weights finite; ``step.loop.storage``
    holds the logged losses.
    """
    from detectron2.utils.events import EventStorage

    from ..engine.trainer import build_training_loop

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
    loop = build_training_loop(model.train(), itertools.repeat(batch), optimizer, amp=amp)
    loop.storage = EventStorage(0)

    def step():
        with loop.storage:
            loop.run_step()
        loop.iter += 1
        loop.storage.iter = loop.iter

    loop.iter = 0
    step.loop = loop
    return step


def time_call(step: Callable[[], Any]) -> float:
    """Seconds of one call of ``step``, the accelerator synchronised before and after."""
    start = timer()
    step()
    return timer() - start


def summarize(times: Sequence[float]) -> Dict[str, float]:
    """``median_s``, ``iqr_s``, ``min_s``, ``max_s`` and ``runs`` of a series of seconds."""
    m = Measurement(1, list(times), TaskSpec("step", "pass"))
    return {"median_s": m.median, "iqr_s": m.iqr, "min_s": min(times), "max_s": max(times),
            "runs": len(times)}  # fmt: skip


def count_syncs(step: Callable[[], Any], cuda: bool = True) -> Dict[str, Any]:
    """Host-device syncs in one call of ``step``: ``syncs`` and ``syncs_in_layers`` (in
    dcnv2/layers or detectron2/layers); "n/a" without ``cuda``."""
    if not cuda:
        return {"syncs": "n/a", "syncs_in_layers": "n/a"}
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    found = [w.filename.replace("\\", "/") for w in caught if "synchroniz" in str(w.message)]
    inside = [f for f in found if "dcnv2/layers" in f or "detectron2/layers" in f]
    return {"syncs": len(found), "syncs_in_layers": len(inside)}


def _status_kib(field: str) -> Optional[int]:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in KiB (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory (MiB) of a ``with`` block: CUDA's ``max_memory_allocated``, else Linux's
    ``VmHWM``. Attributes ``start_mib``, ``peak_mib`` (None where unknown) and ``run_only``
    (whether the mark was reset at the start)."""

    def __init__(self, device: Any = "cpu") -> None:
        self.device = torch.device(device)
        self.start_mib: Optional[float] = None
        self.peak_mib: Optional[float] = None
        self.run_only = False

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mib = torch.cuda.memory_allocated(self.device) / 2**20
            self.run_only = True
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.run_only = True
        except OSError:
            self.run_only = False
        # Read after the reset: the high-water mark then bounds it from above.
        start = _status_kib("VmRSS")
        self.start_mib = None if start is None else start / 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        peak = _status_kib("VmHWM")
        if peak is not None and self.start_mib is not None:
            # RSS counters are batched per CPU: a later mark can read a little below the start.
            self.peak_mib = max(peak / 1024, self.start_mib)

    @property
    def growth_mib(self) -> Optional[float]:
        """``peak_mib - start_mib``: what the block added on top of what was there."""
        if self.peak_mib is None or self.start_mib is None:
            return None
        return self.peak_mib - self.start_mib


def run_in_fresh_process(
    module: str, spec: Dict[str, Any], what: str, env: Optional[Dict[str, str]] = None
) -> Dict[str, Any]:
    """``python -m <module> '<spec as JSON>'`` in a new process; returns the JSON on the last line
    of its stdout (see :func:`worker_main`)."""
    proc = subprocess.run(
        [sys.executable, "-m", module, json.dumps(spec)],
        capture_output=True,
        text=True,
        env=None if env is None else {**os.environ, **env},
    )
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise UserInputError(
            f"benchmark of {what} failed: {lines[-1] if lines else proc.returncode}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Marks the lines of a step worker's stdout that answer the parent; other output is skipped.
_REPLY = "@dcnv2-step "


def _reply(message: Dict[str, Any]) -> None:
    print(_REPLY + json.dumps(message), flush=True)


class InProcessSteps:
    """Steps timed in this process: the in-process :class:`StepWorker`."""

    def __init__(self, steps: Dict[str, Callable[[], Any]]):
        self._steps = dict(steps)
        self.steps = list(self._steps)

    def time(self, step: str) -> float:
        return time_call(self._steps[step])


def serve_steps(steps: Dict[str, Callable[[], Any]]) -> None:
    """The worker's side of :class:`StepWorker`: times the step named on each stdin line."""
    local = InProcessSteps(steps)
    _reply({"steps": local.steps})
    for line in sys.stdin:
        name = line.strip()
        if name == "done":
            return
        _reply({"seconds": local.time(name)})


class StepWorker:
    """A worker process (``python -m <module> '<spec as JSON>'`` calling :func:`serve_steps`)
    timing one step per request; leaving the ``with`` block kills it."""

    def __init__(
        self, module: str, spec: Dict[str, Any], what: str, env: Optional[Dict[str, str]] = None
    ):
        self.what = what
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", module, json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=None if env is None else {**os.environ, **env},
        )
        self.steps: List[str] = self._answer()["steps"]

    def time(self, step: str) -> float:
        self._send(step)
        return self._answer()["seconds"]

    def finish(self) -> Dict[str, Any]:
        """Ends the worker; returns the JSON result it prints last (see :func:`worker_main`)."""
        self._send("done")
        self._proc.stdin.close()
        lines = self._proc.stdout.read().strip().splitlines()
        self._proc.wait()
        if self._proc.returncode != 0 or not lines:
            self._fail()
        return json.loads(lines[-1])

    def __enter__(self) -> "StepWorker":
        return self

    def __exit__(self, *exc) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._stderr.close()

    def _send(self, line: str) -> None:
        try:
            self._proc.stdin.write(line + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._fail()

    def _answer(self) -> Dict[str, Any]:
        for line in self._proc.stdout:
            if line.startswith(_REPLY):
                return json.loads(line[len(_REPLY) :])
        self._fail()

    def _fail(self):
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._stderr.seek(0)
        lines = [line for line in self._stderr.read().strip().splitlines() if line.strip()]
        self._stderr.close()
        raise UserInputError(
            f"benchmark of {self.what} failed: {lines[-1] if lines else self._proc.returncode}"
        )


def interleaved_times(
    workers: Dict[str, Any],
    steps: Sequence[str],
    repeats: int,
    warmup: int = 1,
    after_round: Optional[Callable[[], None]] = None,
) -> Dict[str, Dict[str, List[float]]]:
    """Times of ``steps`` in every worker, in rounds: each step once per worker, the workers' order
    rotated by one every round.

    Args:
        workers: name -> anything with ``steps`` and ``time(step)``.
        repeats: timed rounds, after ``warmup`` untimed ones.

    Returns:
        dict: name -> {step: ``repeats`` seconds}, for the steps the worker has.
    """
    names = list(workers)
    times = {n: {s: [] for s in steps if s in workers[n].steps} for n in names}
    for r in range(warmup + repeats):
        k = r % len(names) if names else 0
        order = names[k:] + names[:k]
        for step in steps:
            for name in order:
                if step in times[name]:
                    seconds = workers[name].time(step)
                    if r >= warmup:
                        times[name][step].append(seconds)
        if after_round is not None:
            after_round()
    return times


def worker_main(measure: Callable[[Dict[str, Any]], Dict[str, Any]]) -> None:
    """Worker process entry: JSON spec in ``sys.argv[1]``, JSON result on stdout's last line.
    Known third-party messages are already dropped: this module imports :mod:`.cli`."""
    print(json.dumps(measure(json.loads(sys.argv[1]))))


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = True) -> str:
    """The one table writer (tabulate): a Markdown table, or aligned columns for a console."""
    from tabulate import tabulate

    align = None if markdown else ["left"] + ["right"] * (len(header) - 1)
    cells = [["-" if c is None else str(c) for c in row] for row in rows]
    fmt = "github" if markdown else "simple"
    return tabulate(cells, list(header), fmt, disable_numparse=True, colalign=align)
