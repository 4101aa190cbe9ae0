"""dcnv2.tools.gpu_check (tools/gpu_check.py) with --device cpu --quick. No timing is asserted."""

import json

import pytest
import torch

from dcnv2.layers import reference
from dcnv2.tools import gpu_check
from dcnv2.tools.cli import run_cli


@pytest.fixture
def torch_kernels(monkeypatch):
    # The PyTorch-op kernels of the native backend (its CUDA path): no C++ build in the test.
    monkeypatch.setenv("DCNV2_NATIVE_IMPL", "torch")
    # One thread: on a loaded CI host, torch's thread pool makes tiny steps many times slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.timeout(600)
def test_quick_cpu_run_end_to_end(tmp_path, torch_kernels):
    out = tmp_path / "report"
    argv = ["--out", str(out), "--device", "cpu", "--quick", "--work-dir", str(tmp_path / "w")]
    assert run_cli(gpu_check.main, argv) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(sections, "ok")
    assert report["exit_status"] == 0

    assert sections["environment"]["data"]["backends"] == ["native", "torchvision"]
    rows = sections["exactness"]["data"]["rows"]
    # 3 cases x (DCNv2: 6 tensors + DCNv1: 5) x 2 backends x 2 dtypes, all within tolerance
    # except torchvision's known offset gradient at integer points (not gating).
    assert len(rows) == 3 * 11 * 2 * 2
    assert all(r["ok"] for r in rows if r["gating"])
    assert {r["backend"] for r in rows if not r["gating"]} == {"torchvision"}
    assert all(r["ok"] for r in rows if r["backend"] == "native")

    speed = sections["speed"]["data"]["rows"]
    assert {r["method"] for r in speed} == {"conv2d", "native", "torchvision"}
    assert all(r["fwd_median_s"] > 0 and r["fwd_bwd_median_s"] > 0 for r in speed)
    # Model: every backend and the plain baseline, with and without AMP, interleaved.
    model = sections["model"]["data"]
    rows = {(r["model"], r["amp"]): r for r in model["rows"]}
    labels = ["native", "torchvision", "plain"]
    assert list(rows) == [(b, amp) for amp in (False, True) for b in labels]
    for (_, amp), r in rows.items():
        assert r["train_runs"] == r["infer_runs"] == model["repeats"] == 3
        assert r["train_min_s"] <= r["train_median_s"] <= r["train_max_s"]
        assert r["finite"] and r["train_vs_plain"] > 0
        plain = rows["plain", amp]
        assert r["train_vs_plain"] == pytest.approx(r["train_median_s"] / plain["train_median_s"])
        assert r["infer_vs_plain"] == pytest.approx(r["infer_median_s"] / plain["infer_median_s"])
    assert rows["plain", False]["train_vs_plain"] == 1.0
    # Profile: per backend and precision, top CPU ops; syncs are CUDA-only.
    profile = sections["profile"]["data"]["rows"]
    assert [(r["model"], r["amp"]) for r in profile] == [
        (b, amp) for amp in (False, True) for b in labels[:2]
    ]
    for r in profile:
        assert r["syncs"] == "n/a" and r["cpu_ms"] > 0 and len(r["top"]) == 5
        assert r["top"][0]["ms"] >= r["top"][-1]["ms"] > 0
    eval_ = sections["eval"]["data"]
    assert eval_["returncode"] == 0 and any("AP" in line for line in eval_["results"])
    ddp = sections["ddp"]["data"]
    assert (ddp["world_size"], ddp["process_group"], ddp["wrapped"]) == (
        1,
        "gloo",
        "DistributedDataParallel",
    )
    markdown = (out / "gpu_check.md").read_text()
    for name in gpu_check.SECTIONS:
        assert f"## {name}: ok" in markdown
    assert "host syncs n/a" in markdown and "train_vs_plain" in markdown


def test_a_wrong_reference_makes_the_check_exit_non_zero(tmp_path, torch_kernels, monkeypatch):
    true_reference = reference.deform_conv_reference

    def off_by_a_little(*args, **kwargs):
        result = true_reference(*args, **kwargs)
        result["weight"] = result["weight"] * (1 + 1e-3)
        return result

    monkeypatch.setattr(reference, "deform_conv_reference", off_by_a_little)
    out = tmp_path / "report"
    argv = ["--out", str(out), "--device", "cpu", "--quick", "--sections", "exactness"]
    assert run_cli(gpu_check.main, argv) == 1
    report = json.loads((out / "gpu_check.json").read_text())
    exactness = report["sections"]["exactness"]
    assert exactness["status"] == "failed" and report["exit_status"] == 1
    rows = exactness["data"]["rows"]
    failed = {(r["backend"], r["tensor"]) for r in rows if r["gating"] and not r["ok"]}
    assert failed == {("native", "weight"), ("torchvision", "weight")}
    assert "FAIL" in (out / "gpu_check.md").read_text()


def test_spent_budget_skips_every_section_and_still_writes_the_report(tmp_path):
    status = gpu_check.run_check(str(tmp_path), device="cpu", quick=True, time_budget=0)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {s["status"] for s in report["sections"].values()} == {"skipped"}
    assert list(report["sections"]) == list(gpu_check.SECTIONS)
    assert status == 1  # exactness was not shown


def test_a_crashing_section_is_recorded_and_the_next_one_runs(tmp_path, torch_kernels, monkeypatch):
    def broken(ctx):
        raise RuntimeError("speed section exploded")

    monkeypatch.setitem(gpu_check._CHECKS, "speed", broken)
    status = gpu_check.run_check(
        str(tmp_path), device="cpu", quick=True, sections=["environment", "speed"]
    )
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["sections"]["speed"]["status"] == "error"
    assert "speed section exploded" in report["sections"]["speed"]["error"]
    assert report["sections"]["environment"]["status"] == "ok"
    assert status == 3


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_cuda_without_a_gpu_is_one_error_line(tmp_path, capsys):
    assert run_cli(gpu_check.main, ["--out", str(tmp_path)], prog="gpu_check.py") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["gpu_check.py: error: --device cuda: no CUDA device is visible to torch here"]


def test_a_failing_model_configuration_is_reported_and_the_others_are_timed(
    tmp_path, torch_kernels, monkeypatch
):
    build = gpu_check._build

    def build_or_fail(ctx, spec):
        if spec["model"] == "torchvision" and spec["amp"]:
            raise RuntimeError("CUDA out of memory (simulated)")
        return build(ctx, spec)

    monkeypatch.setattr(gpu_check, "_build", build_or_fail)
    status = gpu_check.run_check(str(tmp_path), device="cpu", quick=True, sections=["model"])
    model = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["model"]
    assert status == 3 and model["status"] == "failed"
    assert model["data"]["problems"] == [
        "torchvision amp=True: RuntimeError: CUDA out of memory (simulated)"
    ]
    timed = [(r["model"], r["amp"]) for r in model["data"]["rows"] if "train_median_s" in r]
    assert len(timed) == 5 and ("plain", True) in timed
    assert "CUDA out of memory (simulated)" in (tmp_path / "gpu_check.md").read_text()
