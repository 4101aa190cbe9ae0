"""The one timing harness of the benchmarks and the GPU check: steps timed with
torch.utils.benchmark's clock in interleaved rounds across workers (in this process or in worker
processes), so that ratios hold when the host's speed drifts; medians and IQR by
``torch.utils.benchmark.Measurement``.
"""

import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import warnings
from functools import cached_property
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from tabulate import tabulate
from torch.utils.benchmark import Measurement
from torch.utils.benchmark.utils.common import TaskSpec
from torch.utils.benchmark.utils.timer import timer

from ..engine.trainer import build_training_loop
from ..errors import UserInputError


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
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
    loop = build_training_loop(model.train(), itertools.repeat(batch), optimizer, amp=amp)
    loop.iter, loop.storage = 0, EventStorage(0)

    def step():
        with loop.storage:
            loop.run_step()
        loop.iter += 1
        loop.storage.iter = loop.iter

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


def forward_steps(forward: Callable[[], Any], leaves: Sequence[torch.Tensor]):
    """Forward without grad and forward+backward (of ``forward().float().sum()``, clearing the
    grads of ``leaves``) as functions without arguments."""

    def no_grad_forward():
        with torch.no_grad():
            forward()

    def forward_backward():
        forward().float().sum().backward()
        for t in leaves:
            t.grad = None

    return no_grad_forward, forward_backward


def count_syncs(step: Callable[[], Any], cuda: bool = True) -> Dict[str, Any]:
    """Host-device syncs in one call of ``step``: ``syncs`` and ``syncs_in_layers`` (in
    dcnv2/layers or detectron2/layers); "n/a" without ``cuda``."""
    if not cuda:
        return {"syncs": "n/a", "syncs_in_layers": "n/a"}
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


def _status_mib(field: str) -> Optional[float]:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in MiB (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))
    except OSError:
        return None


class PeakMemory:
    """Peak memory (MiB) of a ``with`` block: CUDA's ``max_memory_allocated``, else Linux's
    ``VmHWM``. Attributes ``start_mib``, ``peak_mib``, ``growth_mib`` (peak - start; each None
    where unknown) and ``run_only`` (whether the mark was reset at the start)."""

    def __init__(self, device: Any = "cpu") -> None:
        self.device = torch.device(device)
        self.start_mib = self.peak_mib = self.growth_mib = None
        self.run_only = False

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mib, self.run_only = torch.cuda.memory_allocated(self.device) / 2**20, True
            return self
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.run_only = True
        # Read after the reset: the high-water mark then bounds it from above.
        self.start_mib = _status_mib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.start_mib is not None:
            # RSS counters are batched per CPU: a later mark can read a little below the start.
            self.peak_mib = max(_status_mib("VmHWM"), self.start_mib)
        if self.peak_mib is not None:
            self.growth_mib = self.peak_mib - self.start_mib


class InProcessSteps:
    """Steps timed in this process: the in-process :class:`StepWorker`."""

    def __init__(self, steps: Dict[str, Callable[[], Any]]):
        self._steps = dict(steps)
        self.steps = list(self._steps)

    def time(self, step: str) -> float:
        return time_call(self._steps[step])


# Starts the lines of a worker's stdout that answer the parent; other output is skipped.
_REPLY = "@dcnv2-reply "


def _reply(key: str, value: Any) -> None:
    print(f"{_REPLY}{key} {json.dumps(value)}", flush=True)


def serve_steps(steps: Dict[str, Callable[[], Any]]) -> None:
    """The worker's side of :class:`StepWorker`: times the step named on each stdin line."""
    _reply("steps", list(steps))
    for line in sys.stdin:
        if line.strip() == "done":
            return
        _reply("seconds", time_call(steps[line.strip()]))


def worker_main(measure: Callable[[Dict[str, Any]], Dict[str, Any]]) -> None:
    """A worker process's entry: ``measure(spec)`` (the JSON spec in ``sys.argv[1]``), which may
    :func:`serve_steps`; then its result."""
    _reply("result", measure(json.loads(sys.argv[1])))


class StepWorker:
    """A worker process, ``python -m <module> '<spec as JSON>'`` calling :func:`worker_main`:
    ``steps`` and ``time(step)`` as :func:`serve_steps` serves them, then ``finish()``, the
    result. Leaving the ``with`` block kills it; a failure is one :class:`UserInputError`."""

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

    @cached_property
    def steps(self) -> List[str]:
        return self._ask(None, "steps")

    def time(self, step: str) -> float:
        return self._ask(step, "seconds")

    def finish(self) -> Dict[str, Any]:
        return self._ask("done", "result")

    def __enter__(self) -> "StepWorker":
        return self

    def __exit__(self, *exc) -> None:
        self._proc.kill()
        self._proc.communicate()  # reaps it and closes the pipes
        self._stderr.close()

    def _ask(self, request: Optional[str], key: str) -> Any:
        """Send ``request`` (a stdin line) if given; the value of the next ``key`` reply."""
        with contextlib.suppress(OSError):  # a worker that has ended: its stderr says why
            if request is not None:
                self._proc.stdin.write(request + "\n")
                self._proc.stdin.flush()
        prefix = f"{_REPLY}{key} "
        for line in self._proc.stdout:
            if line.startswith(prefix):
                return json.loads(line[len(prefix) :])
        self._proc.wait()
        self._stderr.seek(0)
        lines = [line for line in self._stderr.read().splitlines() if line.strip()]
        raise UserInputError(
            f"benchmark of {self.what} failed: {lines[-1] if lines else self._proc.returncode}"
        )


def run_in_fresh_process(
    module: str, spec: Dict[str, Any], what: str, env: Optional[Dict[str, str]] = None
) -> Dict[str, Any]:
    """The result of a :class:`StepWorker` that serves no steps."""
    with StepWorker(module, spec, what, env) as worker:
        return worker.finish()


def interleaved_times(
    workers: Dict[str, Any],
    steps: Sequence[str],
    repeats: int,
    warmup: int = 1,
    after_round: Optional[Callable[[], None]] = None,
) -> Dict[str, Dict[str, List[float]]]:
    """Times of ``steps`` in ``workers`` (name -> anything with ``steps`` and ``time(step)``):
    ``warmup`` untimed rounds, then ``repeats`` timed ones, each step once per worker, the workers'
    order rotated by one every round. Returns name -> {step: seconds}, for the steps it has."""
    names = list(workers)
    times = {n: {s: [] for s in steps if s in workers[n].steps} for n in names}
    for r in range(warmup + repeats):
        k = r % len(names) if names else 0
        for step in steps:
            for name in names[k:] + names[:k]:
                if step in times[name]:
                    seconds = workers[name].time(step)
                    if r >= warmup:
                        times[name][step].append(seconds)
        if after_round is not None:
            after_round()
    return times


def write_json(obj: Any, path: str) -> None:
    """``obj`` as indented JSON at ``path``: the results file of every benchmark."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = True) -> str:
    """The one table writer (tabulate): a Markdown table, or aligned columns for a console."""
    align = None if markdown else ["left"] + ["right"] * (len(header) - 1)
    cells = [["-" if c is None else str(c) for c in row] for row in rows]
    fmt = "github" if markdown else "simple"
    return tabulate(cells, list(header), fmt, disable_numparse=True, colalign=align)
