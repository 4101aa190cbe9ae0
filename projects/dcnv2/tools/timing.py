"""What the op, model and mimicking benchmarks share: the synthetic detection batch, the timing
of repeated runs, the peak resident memory of a run, one fresh process per case, workers timed
in interleaved rounds, and the table writer.

Timing: ``warmup`` untimed calls, then ``repeats`` calls each timed with ``time.perf_counter``;
the benchmarks report every time and their median. (``torch.utils.benchmark.Timer`` would run
one thread unless told otherwise and report block averages, not each run.)

Peak memory: the process's resident-set high-water mark (Linux ``VmHWM``) is reset to the
current resident set (``/proc/self/clear_refs``) just before the measured runs and read after
them, so it counts every page torch touched during the runs (the allocator's freed-but-kept
pages included) on top of what was resident before, and nothing from imports or model building.

Interleaved rounds (:class:`StepWorker`, :func:`interleaved_times`): methods that must not share
a process (allocator state, their libraries' thread pools) each get a persistent worker, and the
parent asks them in turn for one timed run of a step, round after round. Every method then sees
the same minutes of a shared, noisy host, so their ratios hold even when the host's speed
drifts; one process per method run one after the other would give each its own minute.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .cli import UserInputError

__all__ = [
    "InProcessSteps",
    "PeakRSS",
    "StepWorker",
    "detection_batch",
    "interleaved_times",
    "run_in_fresh_process",
    "serve_steps",
    "sgd_step",
    "text_table",
    "time_runs",
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
    """A fixed random batch in detectron2's input format.

    Args:
        num_images, height, width: the batch's size; images are float32 (3, height, width)
            with integer values in [0, 255].
        boxes_per_image: random ground-truth boxes per image (at least 16 px a side, inside the
            image) under ``"instances"``, for training; 0 for inference (no ``"instances"``).
        num_classes: classes of the random ``gt_classes``.
        seed: the same seed gives the same batch.

    Returns:
        list[dict]: ``{"image", "height", "width"[, "instances"]}`` per image.
    """
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


def time_runs(step: Callable[[], Any], warmup: int, repeats: int) -> List[float]:
    """Seconds of each of ``repeats`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def sgd_step(model: torch.nn.Module, batch: List[Dict[str, Any]], lr: float, momentum: float = 0.0):
    """A function running one training iteration of ``model`` on ``batch``: forward (the loss
    dict), backward of the summed losses and an SGD step. Call it inside an ``EventStorage``
    (detectron2's training-mode models log to it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)

    def step():
        losses = model(batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    return step


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


class PeakRSS:
    """Peak resident memory of the runs inside a ``with`` block (see the module docstring).

    Attributes (MiB, None where ``/proc`` cannot tell): ``start_mib``, the resident set when the
    block starts; ``peak_mib``, the high-water mark during the block (at least ``start_mib``);
    ``run_only``, whether the mark was reset at the start (else it includes earlier peaks).
    """

    def __init__(self) -> None:
        self.start_mib: Optional[float] = None
        self.peak_mib: Optional[float] = None
        self.run_only = False

    def __enter__(self) -> "PeakRSS":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.run_only = True
        except OSError:
            self.run_only = False
        # Read after the reset: the high-water mark then bounds it from above (the allocator may
        # hand pages back between a read before the reset and the reset itself).
        start = _status_kib("VmRSS")
        self.start_mib = None if start is None else start / 1024
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_kib("VmHWM")
        if peak is None or self.start_mib is None:
            return
        # The kernel's RSS counters are batched per CPU, so a later high-water mark can read a
        # few pages below an earlier RSS; the peak is at least the size the block started at.
        self.peak_mib = max(peak / 1024, self.start_mib)

    @property
    def growth_mib(self) -> Optional[float]:
        """``peak_mib - start_mib``: what the runs added on top of the inputs and weights."""
        if self.peak_mib is None or self.start_mib is None:
            return None
        return self.peak_mib - self.start_mib


def run_in_fresh_process(
    module: str, spec: Dict[str, Any], what: str, env: Optional[Dict[str, str]] = None
) -> Dict[str, Any]:
    """``python -m <module> '<spec as JSON>'`` in a new process (so that no allocator state or
    peak memory carries over from another case); its result is the JSON on the last line of
    its stdout (see :func:`worker_main`). ``env``: variables added to the worker's environment.

    Raises:
        UserInputError: the worker failed; the message quotes its last error line.
    """
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


# Marks the lines of a step worker's stdout that answer the parent; anything else a library
# prints there is skipped.
_REPLY = "@dcnv2-step "


def _reply(message: Dict[str, Any]) -> None:
    print(_REPLY + json.dumps(message), flush=True)


class InProcessSteps:
    """Steps (name -> function without arguments) timed in this process, one call at a time:
    what :func:`interleaved_times` asks of a :class:`StepWorker`, for methods that can share a
    process.

    Attributes:
        steps (list[str]): the steps' names.
    """

    def __init__(self, steps: Dict[str, Callable[[], Any]]):
        self._steps = dict(steps)
        self.steps = list(self._steps)

    def time(self, step: str) -> float:
        """Seconds of one call of ``step``."""
        return time_runs(self._steps[step], 0, 1)[0]


def serve_steps(steps: Dict[str, Callable[[], Any]]) -> None:
    """The worker's side of :class:`StepWorker`: announces ``steps`` (name -> function), then
    runs and times one call of the step named on each line of stdin, answering with its
    seconds, until the line ``done``."""
    local = InProcessSteps(steps)
    _reply({"steps": local.steps})
    for line in sys.stdin:
        name = line.strip()
        if name == "done":
            return
        _reply({"seconds": local.time(name)})


class StepWorker:
    """A persistent worker process (``python -m <module> '<spec as JSON>'``, whose ``measure``
    sets up the case and calls :func:`serve_steps`) that times one step at a time on request.

    Use it as a context manager: leaving the block kills a worker that was not finished.

    Attributes:
        steps (list[str]): the steps the worker can run.

    Raises:
        UserInputError: the worker failed (at start, in a step, or at the end); the message
            quotes its last error line.
    """

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
        """Seconds of one run of ``step`` in the worker."""
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
    """Times of ``steps`` in every worker, in rounds: each round runs each step once in each
    worker that has it, the workers in turn (their order rotated by one every round, so none is
    always first after the others). The first ``warmup`` rounds are untimed.

    Args:
        workers: name -> :class:`StepWorker` or :class:`InProcessSteps` (anything with
            ``steps`` and ``time(step)``).
        steps: the steps to time, in the order each round runs them.
        repeats: timed rounds.
        warmup: untimed rounds before them.
        after_round: called after every round (a progress bar's update).

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
    """Entry point of a worker process: one JSON spec in ``sys.argv[1]``, one JSON result
    printed on the last line of stdout."""
    import warnings

    warnings.filterwarnings("ignore")
    print(json.dumps(measure(json.loads(sys.argv[1]))))


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = True) -> str:
    """The benchmarks' tables, cells as given (``str()`` of each).

    Args:
        header: column titles.
        rows: one sequence of cells per row.
        markdown: a Markdown table (``| a | b |``, cells unpadded, as pasted into the README);
            else columns aligned with spaces for a console, the first one left-aligned and the
            others right-aligned.
    """
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        lines.insert(1, "|" + "---|" * len(header))
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        " ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in cells
    )
