"""Modulated deformable RoI pooling: the op against detectron2's/torchvision's RoIAlign, its
gradients, the zero-init convention, edge cases, the pooler's parameter layouts, and one training
step of each mdpool recipe on CPU."""

import math

import numpy as np
import pytest
import torch
from detectron2.config import instantiate
from detectron2.modeling import build_model
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage
from torchvision.ops import roi_align

import dcnv2
from dcnv2.config import load_config
from dcnv2.layers import ModulatedDeformRoIAlign, deform_roi_align
from dcnv2.modeling import DeformableROIPooler

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
IMG_H, IMG_W = 150, 190  # odd sizes on purpose


def _pyramid(channels=3, batch=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [(math.ceil(IMG_H * s), math.ceil(IMG_W * s)) for s in SCALES]
    return [torch.randn(batch, channels, h, w, generator=g).to(dtype) for h, w in sizes]


def _boxes():
    """Boxes of every FPN level, some partly or entirely outside the image, one degenerate."""
    first = [
        [10.0, 12.0, 40.5, 33.0],  # small: p2
        [-20.0, -15.0, 60.0, 50.0],  # partly outside, top-left
        [30.0, 20.0, 180.0, 140.0],  # p3/p4
        [120.0, 100.0, 260.0, 230.0],  # partly outside, bottom-right
        [300.0, 300.0, 340.0, 330.0],  # entirely outside
    ]
    second = [
        [0.0, 0.0, 190.0, 150.0],  # whole image
        [5.0, 5.0, 5.0, 9.0],  # zero width
        [50.3, 60.7, 170.2, 140.9],
        [-300.0, -200.0, 700.0, 600.0],  # huge: p5
    ]
    return [Boxes(torch.tensor(b)) for b in (first, second)]  # Boxes are float32


def _rois(box_lists, dtype=torch.float64):
    """(R, 5) rows (batch index, x0, y0, x1, y1)."""
    rows = [
        torch.cat([torch.full((len(b), 1), float(i)), b.tensor], 1) for i, b in enumerate(box_lists)
    ]
    return torch.cat(rows).to(dtype)


def _pooler(share=False, channels=3, size=7, sampling_ratio=0, fc_dim=16):
    return DeformableROIPooler(
        size,
        SCALES,
        sampling_ratio,
        in_channels=channels,
        fc_dim=fc_dim,
        share_across_levels=share,
    )


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_zero_offsets_unit_modulation_equal_detectron2_roialignv2(sampling_ratio, dtype, atol):
    features, boxes = _pyramid(dtype=dtype), _boxes()
    pooler = _pooler(sampling_ratio=sampling_ratio).to(dtype)
    for layer in pooler.level_poolers:
        # The branches' outputs replaced by zero offsets and a modulation of exactly 1.
        layer.predict = lambda f, r, s: (
            f.new_zeros(r.shape[0], 2, 7, 7),
            f.new_ones(r.shape[0], 1, 7, 7),
        )
    reference = ROIPooler(7, SCALES, sampling_ratio, "ROIAlignV2")(features, boxes)
    out = pooler(features, boxes)
    assert out.shape == (9, 3, 7, 7) and out.dtype == dtype
    assert reference.abs().sum() > 0
    torch.testing.assert_close(out, reference, atol=atol, rtol=0)
    assert out[4].abs().max() == 0  # entirely outside the image, as RoIAlign


@pytest.mark.parametrize("sampling_ratio", [0, 3])
def test_constant_offset_equals_roialign_of_shifted_boxes(sampling_ratio):
    features = _pyramid(batch=2)[0]
    rois = _rois(_boxes())
    dx, dy, gamma = 0.37, -0.21, 0.1
    offset = torch.empty(len(rois), 2, 7, 7, dtype=torch.float64)
    offset[:, 0], offset[:, 1] = dx, dy
    out = deform_roi_align(
        features, rois, offset, output_size=7, spatial_scale=0.25,
        sampling_ratio=sampling_ratio, gamma=gamma,
    )  # fmt: skip
    w, h = rois[:, 3] - rois[:, 1], rois[:, 4] - rois[:, 2]
    shifted = rois.clone()
    shifted[:, [1, 3]] += (gamma * dx * w)[:, None]
    shifted[:, [2, 4]] += (gamma * dy * h)[:, None]
    reference = roi_align(features, shifted, 7, 0.25, sampling_ratio, True)
    assert (out - roi_align(features, rois, 7, 0.25, sampling_ratio, True)).abs().max() > 1e-3
    torch.testing.assert_close(out, reference, atol=1e-10, rtol=0)


def test_gradcheck_features_offsets_and_modulation():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 2, 6, 7, dtype=torch.float64, generator=g, requires_grad=True)
    rois = torch.tensor(
        [[0, 3.0, 2.0, 20.0, 19.0], [1, -4.0, 6.0, 14.0, 30.0], [1, 10.0, 1.0, 27.0, 9.0]],
        dtype=torch.float64,
    )
    offset = (0.5 * torch.randn(3, 2, 2, 3, dtype=torch.float64, generator=g)).requires_grad_()
    mask = torch.rand(3, 1, 2, 3, dtype=torch.float64, generator=g).requires_grad_()

    def pool(f, o, m):
        return deform_roi_align(f, rois, o, output_size=(2, 3), spatial_scale=0.25) * m

    assert torch.autograd.gradcheck(pool, (features, offset, mask), eps=1e-6, atol=1e-6)


def test_fresh_layer_is_half_roialign_and_trains_both_branches():
    features = _pyramid(channels=4)[1].requires_grad_()
    rois = _rois(_boxes())
    layer = ModulatedDeformRoIAlign(
        output_size=7, in_channels=4, spatial_scale=1 / 8, fc_dim=32
    ).double()
    assert all(m.weight.abs().max() == 0 for m in (layer.offset_fc[-1], layer.mask_fc[-2]))
    assert [type(m).__name__ for m in layer.mask_fc] == ["Linear", "ReLU", "Linear", "Sigmoid"]
    assert len(layer.offset_fc) == 5  # mmcv's layout: Linear, ReLU, Linear, ReLU, Linear
    out = layer(features, rois)
    expected = 0.5 * roi_align(features, rois, 7, 1 / 8, 0, True)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    (out * torch.randn_like(out)).sum().backward()
    assert features.grad.abs().sum() > 0
    assert layer.offset_fc[-1].weight.grad.abs().sum() > 0
    assert layer.mask_fc[-2].weight.grad.abs().sum() > 0


def test_empty_roi_lists_and_levels_without_rois():
    features = [f.float().requires_grad_() for f in _pyramid(channels=3)]
    pooler = _pooler()
    empty = [Boxes(torch.zeros(0, 4)), Boxes(torch.zeros(0, 4))]
    out = pooler(features, empty)
    assert out.shape == (0, 3, 7, 7)
    out.sum().backward()  # a graph, even if empty
    # One image without boxes, one box on p2 only: the other levels still run (DDP needs every
    # parameter in the graph), with zero gradients.
    out = pooler(features, [Boxes(torch.zeros(0, 4)), Boxes(torch.tensor([[5.0, 5, 30, 25]]))])
    assert out.shape == (1, 3, 7, 7)
    (out * torch.randn_like(out)).sum().backward()
    grads = [p.grad for p in pooler.parameters()]
    assert all(g is not None for g in grads)
    assert pooler.level_poolers[0].mask_fc[-2].weight.grad.abs().sum() > 0
    assert pooler.level_poolers[3].mask_fc[-2].weight.grad.abs().sum() == 0


def test_shared_and_per_level_layouts():
    per_level, shared = _pooler(share=False), _pooler(share=True)
    assert len(per_level.level_poolers) == 4 and len(shared.level_poolers) == 4
    # The shared parameters are saved once, under level 0 (the per-level layout's level-0 keys).
    assert list(shared.state_dict()) == [
        k for k in per_level.state_dict() if k.startswith("level_poolers.0.")
    ]
    one = sum(p.numel() for p in shared.parameters())
    assert sum(p.numel() for p in per_level.parameters()) == 4 * one
    # Same function when every level holds the shared weights, with each level's own scale.
    g = torch.Generator().manual_seed(3)
    for p in shared.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.05
    for layer in per_level.level_poolers:
        layer.load_state_dict(shared.level_poolers[0].state_dict())
    features, boxes = [f.float() for f in _pyramid()], _boxes()
    out = shared(features, boxes)
    torch.testing.assert_close(out, per_level(features, boxes), atol=0, rtol=0)
    assert not torch.allclose(out, 0.5 * ROIPooler(7, SCALES, 0, "ROIAlignV2")(features, boxes))


def test_autocast_cpu_bfloat16_forward_backward():
    layer = ModulatedDeformRoIAlign(output_size=7, in_channels=3, spatial_scale=0.25, fc_dim=16)
    features = _pyramid()[0].float().requires_grad_()
    rois = _rois(_boxes(), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(features, rois)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0


def test_bad_inputs_raise_clear_errors():
    features, rois = torch.zeros(1, 3, 8, 8), torch.tensor([[0, 1.0, 1, 5, 5]])
    with pytest.raises(ValueError, match=r"offset must be \(R, 2, 7, 7\)"):
        deform_roi_align(features, rois, torch.zeros(1, 2, 3, 3), output_size=7)
    with pytest.raises(ValueError, match=r"rois must be \(R, 5\)"):
        deform_roi_align(features, rois[:, 1:], output_size=7)
    layer = ModulatedDeformRoIAlign(output_size=7, in_channels=4, fc_dim=8)
    with pytest.raises(ValueError, match=r"expected \(N, 4, H, W\) features"):
        layer(features, rois)
    with pytest.raises(ValueError, match="output_size must be a positive int or pair"):
        deform_roi_align(features, rois, output_size=(7, 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    layer = ModulatedDeformRoIAlign(output_size=7, in_channels=3, spatial_scale=0.25, fc_dim=16)
    for p in layer.parameters():
        p.data.normal_(0, 0.05)
    features, rois = _pyramid()[0].float(), _rois(_boxes(), torch.float32)
    expected = layer(features, rois)
    out = layer.cuda()(features.cuda(), rois.cuda())
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=1e-4)


# ---- Recipes: build from the YAML, one training step on CPU. ----

H, W = 128, 176
SMALL = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "100", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "40",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.DCNV2.MDPOOL.FC_DIM", "32",  # 1024-wide fcs are 25M parameters per level
]  # fmt: skip


def _batch():
    """Two images: one with two objects (boxes, classes, polygons), one without annotations."""
    annotated = Instances((H, W))
    annotated.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 90.0, 100.0], [60.0, 20.0, 170.0, 70.0]]))
    annotated.gt_classes = torch.tensor([3, 17])
    annotated.gt_masks = PolygonMasks(
        [[np.array([10, 12, 90, 12, 50, 100.0])], [np.array([60, 20, 170, 20, 170, 70, 60, 70.0])]]
    )
    empty = Instances((H, W))
    empty.gt_boxes = Boxes(torch.zeros(0, 4))
    empty.gt_classes = torch.zeros(0, dtype=torch.long)
    empty.gt_masks = PolygonMasks([])
    images = torch.randint(0, 256, (2, 3, H, W), generator=torch.Generator().manual_seed(0))
    return [
        {"image": im.float(), "instances": inst} for im, inst in zip(images, (annotated, empty))
    ]


@pytest.mark.parametrize(
    "name,opts,mdpool_heads",
    [
        ("faster_rcnn_R50_mdpool_FPN_1x", [], ["box_pooler"]),
        ("faster_rcnn_R50_mdconv_mdpool_FPN_1x", [], ["box_pooler"]),
        ("mask_rcnn_R50_mdconv_mdpool_FPN_1x", [], ["box_pooler"]),
        # The optional variants in one model: Cascade R-CNN, mdpool in the mask head too (shared
        # across levels).
        (
            "mask_rcnn_R50_mdconv_mdpool_FPN_1x",
            ["MODEL.ROI_HEADS.NAME", "DCNv2CascadeROIHeads",
             "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True",
             "MODEL.ROI_MASK_HEAD.POOLER_TYPE", "ModulatedDeformROIAlign",
             "MODEL.DCNV2.MDPOOL.SHARE_ACROSS_LEVELS", "True",
             "MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, False, False, False]"],
            ["box_pooler", "mask_pooler"],
        ),
    ],
)  # fmt: skip
def test_recipe_trains_one_step_on_cpu(name, opts, mdpool_heads):
    cfg = dcnv2.get_cfg(name + ".yaml", SMALL + opts)
    model = build_model(cfg)
    for head in ("box_pooler", "mask_pooler"):
        pooler = getattr(model.roi_heads, head, None)
        assert isinstance(pooler, DeformableROIPooler) == (head in mdpool_heads), head
    assert model.roi_heads.mask_on == cfg.MODEL.MASK_ON
    assert type(model.roi_heads).__name__ == cfg.MODEL.ROI_HEADS.NAME
    torch.manual_seed(0)
    model.train()
    with EventStorage(0):
        losses = model(_batch())
    assert ("loss_mask" in losses) == cfg.MODEL.MASK_ON
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    for head in mdpool_heads:
        pooler = getattr(model.roi_heads, head)
        layers = [m for m in pooler.modules() if isinstance(m, ModulatedDeformRoIAlign)]
        grads = [layer.mask_fc[-2].weight.grad for layer in layers]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    "name",
    [
        "faster_rcnn_R50_mdpool_FPN_1x",
        "faster_rcnn_R50_mdconv_mdpool_FPN_1x",
        "mask_rcnn_R50_mdconv_mdpool_FPN_1x",
    ],
)
def test_lazy_config_builds_the_yaml_model(name):
    yaml_model = build_model(dcnv2.get_cfg(name + ".yaml", SMALL))
    lazy_cfg = load_config(f"lazy/{name}.py", ["model.roi_heads.box_pooler.fc_dim=32"])
    lazy_model = instantiate(lazy_cfg.model)
    assert isinstance(lazy_model.roi_heads.box_pooler, DeformableROIPooler)
    shapes = [{n: p.shape for n, p in m.named_parameters()} for m in (yaml_model, lazy_model)]
    assert shapes[0] == shapes[1]
    lazy_model.load_state_dict(yaml_model.state_dict(), strict=True)
