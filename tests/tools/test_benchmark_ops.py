"""dcnv2.tools.benchmark_ops and tools/benchmark_ops.py on a tiny shape (no speed asserted)."""

import importlib.util
import json
import os

import pytest

from dcnv2.errors import UserInputError
from dcnv2.tools import benchmark_ops
from dcnv2.tools.timing import StepWorker, interleaved_times

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Small enough for a test; odd sizes on purpose.
TINY = "tiny=1,4,9,7"


def _tool():
    spec = importlib.util.spec_from_file_location(
        "dcnv2_tool_benchmark_ops", os.path.join(ROOT, "tools", "benchmark_ops.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_benchmark_runs_on_a_tiny_shape(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    argv = ["--shapes", TINY, "--repeats", "1", "--threads", "1", "--out", str(out)]
    assert _tool().main(argv + ["--plot", str(png)]) == 0
    rows = json.loads(out.read_text())
    methods = {r["method"] for r in rows}
    assert {"conv2d", "native", "torchvision"} <= methods and out.exists() and png.exists()
    # onnxruntime's DeformConv is forward only: no backward time or peak memory.
    trained = [r for r in rows if r["method"] != benchmark_ops.ONNXRUNTIME]
    assert all(r["forward_s"] > 0 and r["forward_backward_s"] > 0 for r in trained)
    assert "| tiny" in benchmark_ops.format_table(rows)
    printed = capsys.readouterr().out
    assert benchmark_ops.format_table(rows) in printed
    assert "\n".join(benchmark_ops.notes(rows)) in printed
    for r in rows:
        assert r["size"] == [1, 4, 9, 7] and (r in trained) == (r["peak_mib"] is not None)
        assert r["peak_mib"] is None or r["peak_mib"] >= 0
        conv2d = next(c for c in rows if c["method"] == "conv2d")
        assert r["forward_vs_conv2d"] == pytest.approx(r["forward_s"] / conv2d["forward_s"])
    if benchmark_ops._onnxruntime_available():
        ort = next(r for r in rows if r["method"] == benchmark_ops.ONNXRUNTIME)
        assert ort["forward_s"] > 0 and ort["forward_backward_s"] is None
        assert ort["max_rel_err"] < 1e-5
        native = next(r for r in rows if r["method"] == "native")
        assert native["forward_vs_onnxruntime"] == pytest.approx(
            native["forward_s"] / ort["forward_s"]
        )
        assert native["forward_backward_vs_onnxruntime"] is None
        assert "fwd / ort" in _rows(benchmark_ops.format_table(rows))[0]


def test_shapes_by_name_or_size():
    assert benchmark_ops.parse_shape("res4") == ("res4", (2, 256, 50, 76))
    assert benchmark_ops.parse_shape("mine=1,2,3,4") == ("mine", (1, 2, 3, 4))
    for bad in ("nope", "x=1,2,3", "x=1,2,3,0", "=1,2,3,4", "x=a,b,c,d"):
        with pytest.raises(ValueError, match="NAME=N,C,H,W"):
            benchmark_ops.parse_shape(bad)


def test_bad_shape_is_one_error_line(capsys):
    from dcnv2.tools.cli import run_cli

    assert run_cli(_tool().main, ["--shapes", "x=1,2"], prog="benchmark_ops.py") == 2
    err = capsys.readouterr().err
    assert err.startswith("benchmark_ops.py: error: shape 'x=1,2'") and len(err.splitlines()) == 1


def _rows(table):
    """A Markdown table's header and rows as lists of stripped cells (separator line dropped)."""
    lines = table.splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[:1] + lines[2:]]


def test_table_cells_and_missing_reference():
    row = dict(
        shape="s",
        size=[1, 2, 3, 4],
        method="native",
        forward_s=0.5,
        forward_backward_s=2.0,
        peak_mib=10.4,
        forward_vs_conv2d=1.25,
        forward_backward_vs_conv2d=2.5,
    )
    lines = _rows(benchmark_ops.format_table([row]))
    assert lines[0][:5] == ["shape", "method", "fwd (s)", "fwd+bwd (s)", "peak MiB"]
    assert len(lines[0]) == 10
    assert lines[1] == [
        "s (1, 2, 3, 4)",
        "native",
        "0.500",
        "2.000",
        "10",
        "1.25",
        "2.50",
        "-",
        "-",
        "-",
    ]


def test_onnxruntime_deform_conv_equals_the_native_op():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import torch

    from dcnv2.layers import modulated_deform_conv

    size = (2, 6, 11, 8)
    x, weight, offset, mask = benchmark_ops.op_inputs(size)
    session = benchmark_ops.onnxruntime_session(size, threads=1)
    feeds = {"X": x.numpy(), "W": weight.numpy(), "offset": offset.numpy(), "mask": mask.numpy()}
    theirs = torch.from_numpy(session.run(None, feeds)[0])
    ours = modulated_deform_conv(x, offset, mask, weight, padding=1, backend="native")
    assert theirs.shape == ours.shape == (2, 6, 11, 8)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    # The offsets matter: without them the result is a plain modulated conv, far from this one.
    still = modulated_deform_conv(x, offset * 0, mask, weight, padding=1, backend="native")
    assert not torch.allclose(theirs, still, atol=1e-3)
    errors = benchmark_ops.compare_onnxruntime(size)
    err = (theirs - ours).abs().max().item()
    assert errors["max_abs_err"] == pytest.approx(err, abs=1e-7)
    assert errors["max_rel_err"] == pytest.approx(err / ours.abs().max().item(), abs=1e-7)


def test_table_has_the_onnxruntime_column_and_notes():
    base = dict(shape="s", size=[1, 2, 3, 4], forward_vs_conv2d=2.0, forward_vs_torchvision=0.5)
    native = dict(base, method="native", forward_s=0.2, forward_backward_s=0.6, peak_mib=3.0)
    native.update(forward_vs_onnxruntime=0.8, forward_backward_vs_onnxruntime=None)
    ort = dict(base, method="onnxruntime", forward_s=0.25, forward_backward_s=None, peak_mib=None)
    ort.update(forward_vs_onnxruntime=1.0, max_abs_err=1.5e-6, max_rel_err=2.5e-7)
    lines = _rows(benchmark_ops.format_table([native, ort]))
    assert lines[0] == [
        "shape", "method", "fwd (s)", "fwd+bwd (s)", "peak MiB", "fwd / conv2d",
        "fwd+bwd / conv2d", "fwd / tv", "fwd / ort", "fwd+bwd / tv", "peak / tv",
    ]  # fmt: skip
    assert lines[1] == ["s (1, 2, 3, 4)", "native", "0.200", "0.600", "3", "2.00", "-", "0.50",
                        "0.80", "-", "-"]  # fmt: skip
    assert lines[2] == ["s (1, 2, 3, 4)", "onnxruntime", "0.250", "-", "-", "2.00", "-", "0.50",
                        "1.00", "-", "-"]  # fmt: skip
    assert benchmark_ops.notes([native, ort]) == [
        "s: onnxruntime DeformConv vs native forward: max abs error 1.50e-06, "
        "max relative error 2.50e-07"
    ]


def test_without_onnxruntime_the_method_is_skipped_with_a_note(monkeypatch):
    monkeypatch.setattr(benchmark_ops, "_onnxruntime_available", lambda: False)
    assert (
        benchmark_ops.ONNXRUNTIME not in benchmark_ops._methods()
        and "native" in benchmark_ops._methods()
    )
    row = dict(shape="s", size=[1, 2, 3, 4], method="native", forward_s=0.1,
               forward_backward_s=0.2, peak_mib=1.0)  # fmt: skip
    assert benchmark_ops.notes([row]) == [
        "onnxruntime's DeformConv not measured: needs `pip install onnxruntime onnx`"
    ]
    assert "ort" not in benchmark_ops.format_table([row])


def test_notes_name_the_ways_native_chose():
    ways = {
        "forward_pass (4, 4, 3, 3) float32 2": "fused",
        "forward (1, 4, 36) float32 2": "columns_first",  # a product inside a pass: not listed
        "backward_pass (4, 4, 3, 3) (True, True, True, True) float32 2": "chunked",
    }
    row = dict(shape="s", size=[1, 4, 9, 7], method="native", ways=ways)
    ort = dict(shape="s", method="onnxruntime", max_abs_err=1e-6, max_rel_err=1e-7)
    assert benchmark_ops.notes([row, ort])[0] == (
        "s: native ran the fused forward, chunked backward (measured on first use)"
    )
    assert benchmark_ops.notes([dict(row, ways={}), ort])[0].startswith("s: onnxruntime")


def test_chosen_ways_names_the_measured_keys(monkeypatch):
    import torch

    from dcnv2.layers import native

    key = ("forward_pass", (4, 4, 3, 3), torch.float32, 2)
    monkeypatch.setattr(native, "_FASTEST", {key: "fused"})
    assert native.chosen_ways() == {"forward_pass (4, 4, 3, 3) float32 2": "fused"}


class FakeWorker:
    """Stands in for a StepWorker: records the steps asked of it in a shared log."""

    def __init__(self, name, steps, log):
        self.name, self.steps, self.log = name, steps, log

    def time(self, step):
        self.log.append((self.name, step))
        return float(len(self.log))


def test_interleaved_rounds_rotate_the_workers_and_skip_missing_steps():
    log = []
    workers = {
        "a": FakeWorker("a", ["forward", "forward_backward"], log),
        "b": FakeWorker("b", ["forward", "forward_backward"], log),
        "ort": FakeWorker("ort", ["forward"], log),
    }
    times = interleaved_times(workers, ("forward", "forward_backward"), repeats=2)
    rounds = [
        ["a", "b", "ort"],  # untimed
        ["b", "ort", "a"],
        ["ort", "a", "b"],
    ]
    expected = []
    for order in rounds:
        expected += [(n, "forward") for n in order]
        expected += [(n, "forward_backward") for n in order if n != "ort"]
    assert log == expected
    # Each time is the log's length when it was taken: the untimed round's 5 are dropped.
    assert times["a"] == {"forward": [8.0, 12.0], "forward_backward": [10.0, 14.0]}
    assert times["ort"] == {"forward": [7.0, 11.0]}


def test_times_from_live_workers_and_memory_from_fresh_processes(monkeypatch):
    """All methods' timing workers of a shape are alive together; peak memory comes from one
    fresh process per method whose glibc returns freed blocks at once
    (MALLOC_MMAP_THRESHOLD_); onnxruntime has no memory worker."""
    calls, alive = [], []

    class Worker(FakeWorker):
        def __init__(self, module, spec, what):
            assert spec["part"] == "time" and module == benchmark_ops.__name__
            ort = spec["method"] == benchmark_ops.ONNXRUNTIME
            super().__init__(
                spec["method"], ["forward"] if ort else list(benchmark_ops.STEPS), calls
            )
            alive.append(self.name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            alive.remove(self.name)

        def time(self, step):
            assert set(alive) == {"conv2d", "native", benchmark_ops.ONNXRUNTIME}
            return {"conv2d": 2.0, "native": 3.0, benchmark_ops.ONNXRUNTIME: 4.0}[self.name] * (
                1 + (step == "forward_backward")
            )

        def finish(self):
            return {"ways": {"k": "fused"}} if self.name == "native" else {}

    def fake(module, spec, what, env=None):
        calls.append((spec["method"], spec["part"], env, tuple(alive)))
        return {"peak_mib": 5.0}

    monkeypatch.setattr(benchmark_ops, "StepWorker", Worker)
    monkeypatch.setattr(benchmark_ops, "run_in_fresh_process", fake)
    monkeypatch.setattr(
        benchmark_ops, "_methods", lambda: ["conv2d", "native", benchmark_ops.ONNXRUNTIME]
    )
    rows = benchmark_ops.run({"s": (1, 2, 3, 4)}, repeats=1, threads=1)
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    assert calls == [("conv2d", "memory", env, ()), ("native", "memory", env, ())]
    assert [r["peak_mib"] for r in rows] == [5.0, 5.0, None]
    assert [r["forward_s"] for r in rows] == [2.0, 3.0, 4.0]
    assert [r["forward_backward_s"] for r in rows] == [4.0, 6.0, None]
    assert rows[1]["ways"] == {"k": "fused"} and rows[1]["forward_vs_conv2d"] == 1.5
    assert rows[2]["forward_vs_conv2d"] == 2.0 and rows[1]["forward_vs_onnxruntime"] == 0.75
    assert rows[1]["peak_vs_conv2d"] == 1.0


def test_worker_serves_timed_steps_then_returns_its_result():
    spec = {"size": [1, 2, 5, 5], "method": "native", "threads": 1, "part": "time"}
    with StepWorker(benchmark_ops.__name__, spec, "tiny") as worker:
        assert worker.steps == list(benchmark_ops.STEPS)
        assert all(worker.time(step) > 0 for step in ("forward", "forward_backward", "forward"))
        result = worker.finish()
    assert set(result) == {"ways"}


def test_a_failing_worker_is_one_error_line_naming_the_case():
    spec = {"size": [1, 2, 5, 5], "method": "no-such-backend", "threads": 1, "part": "time"}
    with pytest.raises(UserInputError, match=r"^benchmark of tiny with x failed: \S.*backend"):
        with StepWorker(benchmark_ops.__name__, spec, "tiny with x") as worker:
            worker.time("forward")


def test_memory_part_measures_only_peak_memory_in_its_own_process():
    from dcnv2.tools.timing import run_in_fresh_process

    spec = {"size": [1, 2, 5, 5], "method": "conv2d", "repeats": 1, "threads": 1}
    result = run_in_fresh_process(
        benchmark_ops.__name__, dict(spec, part="memory"), "x", env=benchmark_ops._MEMORY_ENV
    )
    assert set(result) == {"peak_mib"} and result["peak_mib"] >= 0
