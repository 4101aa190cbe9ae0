"""dcnv2.tools.gpu_check (tools/gpu_check.py) with --device cpu --quick, and its float64
reference (dcnv2.layers.reference) against independent ones. No timing is asserted."""

import ast
import json
import os
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dcnv2.layers import reference
from dcnv2.tools import gpu_check
from dcnv2.tools.cli import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _test_native_module():
    """``detectron2_reference`` and ``_border_case`` of tests/layers/test_native.py, compiled
    alone: importing that module would build the compiled CPU kernels (its ``IMPLS``)."""
    path = os.path.join(ROOT, "tests", "layers", "test_native.py")
    tree = ast.parse(open(path).read())
    wanted = {"detectron2_reference", "_border_case"}
    tree.body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {n.name for n in tree.body} == wanted
    namespace = {"np": np, "torch": torch}
    exec(compile(tree, path, "exec"), namespace)
    return types.SimpleNamespace(**namespace)


@pytest.mark.parametrize("modulated", [True, False])
def test_reference_matches_the_loop_reference_at_integer_and_border_points(modulated):
    """Against tests/layers/test_native.py's loop-by-loop reference (forward, input, offset and
    mask gradients, including points exactly on integers and on the border)."""
    tn = _test_native_module()
    x, offset, mask, weight, grad_out, (s, p, d, dg) = tn._border_case()
    mask = mask if modulated else None
    expected = tn.detectron2_reference(x, offset, mask, weight, grad_out, s, p, d, dg)
    got = reference.deform_conv_reference(x, offset, mask, weight, None, grad_out, s, p, d, 1, dg)
    names = ["out", "input", "offset"] + (["mask"] if modulated else [])
    for name, want in zip(names, expected):
        torch.testing.assert_close(got[name], want, msg=name)
    assert got["bias"] is None and (got["mask"] is None) == (not modulated)


def test_reference_weight_and_bias_gradients_equal_conv2d_at_zero_offsets():
    """Zero offsets and no mask make the op a grouped conv2d: its autograd gradients of input,
    weight and bias are an independent check of the reference's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 2, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    stride, padding, dilation = (2, 1), (1, 2), (1, 2)
    out = F.conv2d(x, weight, bias, stride, padding, dilation, groups=2)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, (x, weight, bias), grad_out)
    offset = torch.zeros(2, 2 * 2 * 6, *out.shape[2:], dtype=torch.float64)
    got = reference.deform_conv_reference(
        x, offset, None, weight, bias, grad_out, stride, padding, dilation, groups=2, dg=2
    )
    assert reference.output_size((6, 7), (3, 2), stride, padding, dilation) == out.shape[2:]
    torch.testing.assert_close(got["out"], out.detach())
    for name, want in zip(("input", "weight", "bias"), grads):
        torch.testing.assert_close(got[name], want, msg=name)


@pytest.fixture
def torch_kernels(monkeypatch):
    # The PyTorch-op kernels of the native backend (its CUDA path): no C++ build in the test.
    monkeypatch.setenv("DCNV2_NATIVE_IMPL", "torch")


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
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in speed)
    model = sections["model"]["data"]
    assert [r["iters"] for r in model["train"]] == [2] and model["train"][0]["losses_finite"]
    assert model["inference"][0]["s_per_image"] > 0
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
    assert "| random | DCNv2 | float32 | offset |" in markdown


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
