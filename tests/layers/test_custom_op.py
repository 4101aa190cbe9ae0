"""torch.ops.dcnv2.deform_conv2d: opcheck, torch.compile without graph breaks, torch.export."""

import pytest
import torch
from detectron2.modeling import build_model

from dcnv2.layers import ops  # noqa: F401  (registers torch.ops.dcnv2)
from dcnv2.layers import ModulatedDeformConv, available_backends, modulated_deform_conv, native_cpp
from dcnv2.layers.reference import deform_conv_reference
from dcnv2.tools.cli import setup_cfg
from dcnv2.tools.visualize_sampling import randomize_offsets

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
OP_CASES = [("torchvision", "auto"), ("native", "torch")] + (
    [("native", "cpp")] if native_cpp.is_available() else []
)


def _op_args(device, dtype, modulated, bias, backend, impl, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c_in, c_out, dg, size = 2, 4, 6, 2, (7, 9)
    ho, wo = 4, 5  # stride 2, padding 1, kernel 3
    x = torch.randn(n, c_in, *size, generator=g, dtype=dtype)
    offset = 1.5 * torch.randn(n, 2 * dg * 9, ho, wo, generator=g, dtype=dtype)
    mask = torch.rand(n, dg * 9, ho, wo, generator=g, dtype=dtype) if modulated else None
    weight = torch.randn(c_out, c_in // 2, 3, 3, generator=g, dtype=dtype)
    b = torch.randn(c_out, generator=g, dtype=dtype) if bias else None
    tensors = [t if t is None else t.to(device).requires_grad_() for t in (x, offset, mask)]
    tensors += [weight.to(device).requires_grad_(), b if b is None else b.to(device)]
    if b is not None:
        tensors[-1].requires_grad_()
    return (*tensors, [2, 2], [1, 1], [1, 1], 2, dg, backend, impl)


@pytest.mark.parametrize("backend,impl", OP_CASES)
@pytest.mark.parametrize("modulated,bias", [(True, True), (False, False)])
def test_opcheck_cpu(backend, impl, modulated, bias):
    args = _op_args("cpu", torch.float64, modulated, bias, backend, impl)
    torch.library.opcheck(torch.ops.dcnv2.deform_conv2d.default, args)


@CUDA
@pytest.mark.parametrize("backend", ["native", "torchvision"])
def test_opcheck_cuda(backend):
    args = _op_args("cuda", torch.float32, True, True, backend, "auto")
    torch.library.opcheck(torch.ops.dcnv2.deform_conv2d.default, args)


@pytest.mark.parametrize("backend,impl", OP_CASES)
def test_op_gradients_match_the_reference(backend, impl):
    """Through the custom op's registered backward, the float64 reference's gradients."""
    args = _op_args("cpu", torch.float64, True, True, backend, impl, seed=3)
    leaves = [t for t in args[:5]]
    out = torch.ops.dcnv2.deform_conv2d(*args)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad_out)
    ref = deform_conv_reference(*leaves, grad_out, (2, 2), (1, 1), (1, 1), 2, 2)
    torch.testing.assert_close(out, ref["out"])
    for a, name in zip(got, ("input", "offset", "mask", "weight", "bias")):
        torch.testing.assert_close(a, ref[name])


def test_compiled_layer_forward_and_backward_match_eager():
    torch.manual_seed(0)
    layer = ModulatedDeformConv(4, 6, 3, padding=1, deformable_groups=2, backend="native")
    x = torch.randn(2, 4, 9, 11, requires_grad=True)
    offset = torch.randn(2, 36, 9, 11, requires_grad=True)
    mask = torch.rand(2, 18, 9, 11, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (layer, compiled):
        out = fn(x, offset, mask)
        grads = torch.autograd.grad(out.square().sum(), (x, offset, mask, layer.weight))
        results.append((out, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.fixture(scope="module")
def backbone_and_image():
    opts = ["MODEL.WEIGHTS", ""]
    cfg = setup_cfg("faster_rcnn_R50_mdconv_FPN_1x.yaml", opts, confidence_threshold=0.0)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = torch.randint(0, 256, (3, 96, 128), generator=torch.Generator().manual_seed(1))
    assert randomize_offsets(model, [{"image": image.float()}], offset_rms=0.7) == 13
    x = model.preprocess_image([{"image": image.float()}]).tensor
    return model.backbone, x


def test_compiled_backbone_has_no_graph_break_and_matches_eager(backbone_and_image):
    backbone, x = backbone_and_image
    with torch.no_grad():
        expected = backbone(x)
        # fullgraph=True raises on any graph break; aot_eager also runs the fake kernels.
        got = torch.compile(backbone, fullgraph=True, backend="aot_eager")(x)
    assert list(got) == list(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)


def test_exported_backbone_has_the_op_and_dynamic_sizes(backbone_and_image):
    backbone, x = backbone_and_image
    h, w = torch.export.Dim("h", min=2, max=64), torch.export.Dim("w", min=2, max=64)
    with torch.no_grad():
        program = torch.export.export(backbone, (x,), dynamic_shapes={"x": {2: 32 * h, 3: 32 * w}})
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.dcnv2.deform_conv2d.default) == 13
    other = torch.nn.functional.interpolate(x, size=(160, 96), mode="bilinear")
    with torch.no_grad():
        for image in (x, other):
            expected = backbone(image)
            got = program.module()(image)
            for name in expected:
                torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)


def test_backend_choice_reaches_the_op():
    if "torchvision" not in available_backends("cpu"):
        pytest.skip("needs torchvision")
    x, offset = torch.randn(1, 2, 5, 5), torch.randn(1, 18, 5, 5)
    weight = torch.randn(3, 2, 3, 3)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm

    fn = torch.compile(modulated_deform_conv, fullgraph=True, backend=record)
    fn(x, offset, None, weight, None, 1, 1, backend="torchvision")
    op = torch.ops.dcnv2.deform_conv2d
    calls = [n for n in graphs[0].graph.nodes if n.target in (op, op.default)]
    assert len(graphs) == 1 and len(calls) == 1 and "torchvision" in calls[0].args
