"""The float64 reference (dcnv2.layers.reference) against independent ones, and every CPU
backend against it through the comparison helpers the GPU check uses."""

import ast
import os
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dcnv2.layers import available_backends, reference

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


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_backends_match_the_reference(backend, dtype):
    """Every case, DCNv2 and DCNv1, within TOLERANCES; torchvision's offset and mask gradients
    at integer points excepted (they differ from detectron2's convention by design)."""
    for case in reference.reference_cases(quick=True):
        for modulated in (True, False):
            errors = reference.backend_errors(case, backend, modulated, dtype)
            bad = {
                k: v
                for k, v in errors.items()
                if not v <= reference.TOLERANCES[dtype]
                and not reference.known_difference(backend, case, k)
            }
            assert not bad, (case["name"], modulated, bad)
