"""dcnv2.tools.benchmark and tools/benchmark.py, on tiny images (no speed asserted)."""

import importlib.util
import json
import os

import pytest

from dcnv2.errors import ConfigFileNotFoundError, UserInputError
from dcnv2.tools import benchmark as benchmark_tool
from dcnv2.tools.benchmark import benchmark, format_table
from dcnv2.tools.timing import StepWorker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = dict(
    config="faster_rcnn_R50_mdconv_FPN_1x.yaml",
    opts=["MODEL.RPN.POST_NMS_TOPK_TEST", "50", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32"],
    height=64,
    width=96,
    batch_size=2,
    seed=0,
)


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_worker_times_and_measures(mode):
    with StepWorker(benchmark_tool.__name__, dict(SPEC, mode=mode), "tiny") as worker:
        assert worker.steps == ["run"]
        times = [worker.time("run") for _ in range(2)]
        result = worker.finish()
    assert result["mode"] == mode and result["backend"] in ("native", "torchvision")
    assert all(t > 0 for t in times)
    # Peak over the runs includes the weights (~160 MiB of float32 parameters) at least.
    assert result["peak_rss_mib"] >= result["rss_build_mib"] > 160


def test_configs_of_a_mode_take_turns_and_rows_keep_config_order(monkeypatch):
    log, alive = [], []

    class Worker:
        def __init__(self, module, spec, what):
            self.key, self.steps = (spec["config"], spec["mode"]), ["run"]
            assert what == f"{spec['config']} ({spec['mode']})"
            alive.append(self.key)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            alive.remove(self.key)

        def time(self, step):
            log.append(self.key)
            assert {m for _, m in alive} == {self.key[1]} and len(alive) == 2
            return float(len(log))

        def finish(self):
            return {"config": self.key[0], "mode": self.key[1]}

    monkeypatch.setattr(benchmark_tool, "StepWorker", Worker)
    configs = ["faster_rcnn_R50_FPN_1x.yaml", "faster_rcnn_R50_mdconv_FPN_1x.yaml"]
    rows = benchmark(configs, warmup=1, repeats=2, progress=False)
    a, b = configs
    # Per mode: one untimed round, then two timed ones; the order rotates every round.
    assert log == [(a, "inference"), (b, "inference"), (b, "inference"), (a, "inference")] + [
        (a, "inference"),
        (b, "inference"),
    ] + [(a, "train"), (b, "train"), (b, "train"), (a, "train"), (a, "train"), (b, "train")]
    assert [(r["config"], r["mode"]) for r in rows] == [
        (a, "inference"), (a, "train"), (b, "inference"), (b, "train")
    ]  # fmt: skip
    assert rows[0]["times_s"] == [4.0, 5.0] and rows[0]["median_s"] == 4.5
    assert rows[3]["times_s"] == [9.0, 12.0]


def test_table_ratios_are_to_the_first_config():
    def row(config, mode, t):
        return dict(
            config=config,
            mode=mode,
            backend="-",
            median_s=t,
            iqr_s=0.0,
            times_s=[t],
            peak_rss_mib=100.0,
            loadavg=[0.5, 0.7],
        )

    table = format_table(
        [
            row("base", "inference", 2.0),
            row("base", "train", 4.0),
            row("md", "inference", 2.5),
            row("md", "train", 6.0),
        ]
    )
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()]
    assert lines[0][:6] == ["config", "backend", "mode", "median s", "IQR s", "ratio"]
    assert ["md", "-", "inference", "2.500", "0.000", "1.25x", "100", "1", "0.7"] in lines
    assert ["md", "-", "train", "6.000", "0.000", "1.50x", "100", "1", "0.7"] in lines


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ConfigFileNotFoundError, match="nope.yaml does not exist"):
        benchmark(["nope.yaml"], progress=False)
    with pytest.raises(UserInputError, match="--repeats"):
        benchmark(["faster_rcnn_R50_FPN_1x.yaml"], repeats=0, progress=False)


def test_tool_runs_each_config_in_a_subprocess(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "dcnv2_tool_bench", os.path.join(ROOT, "tools", "benchmark.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "b.json"
    argv = ["--configs", "faster_rcnn_R50_FPN_1x.yaml", "--modes", "inference", "--height", "64"]
    argv += ["--width", "64", "--warmup", "0", "--repeats", "1", "--no-progress"]
    argv += ["--json", str(out), "--opts", "MODEL.RPN.POST_NMS_TOPK_TEST", "20"]
    assert tool.main(argv) == 0
    assert "| faster_rcnn_R50_FPN_1x.yaml | -         | inference |" in capsys.readouterr().out
    (result,) = json.loads(out.read_text())["results"]
    assert result["peak_rss_is_run_only"] and result["peak_rss_mib"] > 160
