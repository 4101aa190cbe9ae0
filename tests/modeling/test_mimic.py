"""R-CNN feature mimicking: loss, crops, sampling, gradient paths, configs, eval equivalence."""

import pytest
import torch
from detectron2.config import instantiate
from detectron2.modeling import build_model
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

import dcnv2
from dcnv2.config import load_config
from dcnv2.modeling import DeformableROIPooler
from dcnv2.modeling.mimic import (
    MimicGeneralizedRCNN,
    MimicROIHeads,
    RCNNMimicBranch,
    cosine_mimic_loss,
    crop_and_resize,
    sample_positives,
)

CONFIGS = [
    "faster_rcnn_R50_mdconv_mdpool_mimic_FPN_1x.yaml",
    "mask_rcnn_R50_mdconv_mdpool_mimic_FPN_1x.yaml",
]
# Tiny, fast and deterministic: CPU, torchvision's deformable conv, small RPN/ROI budgets.
TINY = [
    "MODEL.DEVICE", "cpu",
    "MODEL.WEIGHTS", "",
    "MODEL.DCNV2.BACKEND", "torchvision",
    "MODEL.ROI_HEADS.NUM_CLASSES", "3",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "100",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "100",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "20",
    "MODEL.DCNV2.MIMIC.CROP_SIZE", "64",
    "MODEL.DCNV2.MIMIC.NUM_POSITIVES_PER_IMAGE", "3",
    "MODEL.DCNV2.MDPOOL.FC_DIM", "64",
    "MODEL.DCNV2.MDPOOL.SHARE_ACROSS_LEVELS", "True",
]  # fmt: skip
# The same configs without mimicking.
PLAIN = [
    "MODEL.META_ARCHITECTURE", "GeneralizedRCNN",
    "MODEL.ROI_HEADS.NAME", "DCNv2StandardROIHeads",
    "MODEL.DCNV2.MIMIC.ENABLED", "False",
]  # fmt: skip


def _model(config, *opts):
    torch.manual_seed(0)
    return build_model(dcnv2.get_cfg(config, TINY + list(opts)))


def _train_losses(model, batch):
    with EventStorage():  # detectron2's training forward logs to it
        return model.train()(batch)


def _batch(mask_on=False):
    """Two odd-sized images; the second has no annotations."""
    g = torch.Generator().manual_seed(1)
    out = []
    for (h, w), boxes, classes in (
        ((131, 171), [[10.0, 12.0, 90.0, 100.0], [60.0, 30.0, 160.0, 120.0]], [0, 2]),
        ((149, 113), [], []),
    ):
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
        if mask_on:
            masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
            for m, (x0, y0, x1, y1) in zip(masks, boxes):
                m[int(y0) : int(y1), int(x0) : int(x1)] = True
            inst.gt_masks = BitMasks(masks)
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        out.append({"image": image, "instances": inst, "height": h, "width": w})
    return out


# --- pure functions ---------------------------------------------------------------------------


def test_cosine_mimic_loss_zero_iff_parallel():
    f = torch.randn(5, 16)
    assert cosine_mimic_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_mimic_loss(f, 3.0 * f).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_mimic_loss(f, -f).item() == pytest.approx(2.0, abs=1e-6)
    other = f + torch.randn(5, 16)
    assert cosine_mimic_loss(f, other).item() > 1e-3
    with pytest.raises(ValueError, match="same shape"):
        cosine_mimic_loss(f, f[:4])


def test_crops_of_a_linear_image_are_exact_per_image():
    # Pixel (i, j) of image b holds ax*j + ay*i + c_b: bilinear sampling of a linear function is
    # exact, so every crop pixel equals the function at its bin centre, computed here directly.
    h, w, s = 60, 80, 7
    ax, ay, cs = 0.5, -2.0, (10.0, 1000.0)
    jj = torch.arange(w, dtype=torch.float64).expand(h, w)
    ii = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w)
    images = torch.stack([(ax * jj + ay * ii + c).expand(3, h, w) for c in cs])
    boxes = [
        torch.tensor([[3.0, 5.0, 40.5, 21.0], [10.0, 2.0, 17.0, 58.0]], dtype=torch.float64),
        torch.tensor([[50.0, 30.0, 78.0, 59.0]], dtype=torch.float64),
    ]
    crops = crop_and_resize(images, boxes, s, sampling_ratio=2)
    assert crops.shape == (3, 3, s, s)
    k = torch.arange(s, dtype=torch.float64) + 0.5
    expected = []
    for c, bs in zip(cs, boxes):
        for x0, y0, x1, y1 in bs.tolist():
            # Pixel j is centred at x = j + 0.5 in box coordinates.
            xs = x0 + k * (x1 - x0) / s - 0.5
            ys = y0 + k * (y1 - y0) / s - 0.5
            expected.append((ax * xs[None, :] + ay * ys[:, None] + c).expand(3, s, s))
    torch.testing.assert_close(crops, torch.stack(expected), rtol=0, atol=1e-9)


def test_crop_of_a_checkerboard_keeps_orientation():
    # 8-px squares, a box on square borders: every 4x4-px bin lies inside one square.
    i, j = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    board = ((i // 8 + 2 * (j // 8)) % 5).float()[None, None]  # not symmetric in x and y
    crop = crop_and_resize(board, [torch.tensor([[8.0, 16.0, 40.0, 48.0]])], 8)[0, 0]
    r, c = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    expected = (((16 + 4 * r) // 8 + 2 * ((8 + 4 * c) // 8)) % 5).float()
    assert torch.equal(crop, expected)
    with pytest.raises(ValueError, match="box lists"):
        crop_and_resize(board, [], 8)


def test_sample_positives_respects_the_cap_and_empty_images():
    bg = 4
    labels = [
        torch.tensor([0, bg, 2, -1, 1, bg, 3, 3]),
        torch.tensor([bg, bg, -1]),
        torch.tensor([], dtype=torch.int64),
        torch.tensor([1, bg]),
    ]
    keep = sample_positives(labels, num_classes=4, max_per_image=3)
    assert [len(k) for k in keep] == [3, 0, 0, 1]
    assert set(keep[0].tolist()) <= {0, 2, 4, 6, 7} and len(set(keep[0].tolist())) == 3
    assert keep[3].tolist() == [0]
    assert [len(k) for k in sample_positives(labels, 4, 100)] == [5, 0, 0, 1]
    assert [len(k) for k in sample_positives(labels, 4, 0)] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match=">= 0"):
        sample_positives(labels, 4, -1)


# --- the branch on tiny modules ---------------------------------------------------------------


class _CountingBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.batch_sizes = []

    def forward(self, x):
        self.batch_sizes.append(x.shape[0])
        return {"p": self.conv(x)}


def _tiny_branch_inputs(labels_per_image, detach=True):
    torch.manual_seed(0)
    backbone = _CountingBackbone()
    pooler = ROIPooler(output_size=2, scales=(1.0,), sampling_ratio=1, pooler_type="ROIAlignV2")
    head = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU())
    branch = RCNNMimicBranch(
        feature_dim=8, num_classes=3, num_positives_per_image=2, crop_size=8, detach_teacher=detach
    )
    features = torch.randn(2, 4, 16, 16, requires_grad=True)  # stands for the detector's maps
    proposals = []
    for labels in labels_per_image:
        p = Instances((16, 16))
        n = len(labels)
        p.proposal_boxes = Boxes(torch.tensor([[1.0, 2.0, 12.0, 14.0]]).repeat(n, 1))
        p.gt_classes = torch.tensor(labels, dtype=torch.int64)
        proposals.append(p)
    losses = branch.losses(
        images=torch.randn(2, 3, 16, 16),
        features=[features],
        proposals=proposals,
        backbone=backbone,
        box_pooler=pooler,
        box_head=head,
        in_features=["p"],
    )
    return losses, backbone, features, branch


@pytest.mark.parametrize("detach", [True, False])
def test_gradient_paths_of_the_two_losses(detach):
    losses, backbone, features, branch = _tiny_branch_inputs([[0, 1, 3, 2], []], detach)
    assert backbone.batch_sizes == [2]  # at most 2 crops from image 0, none from image 1
    w = backbone.conv.weight
    g_feat, g_bb = torch.autograd.grad(
        losses["loss_mimic"], [features, w], retain_graph=True, allow_unused=True
    )
    # The mimic loss pushes the Faster R-CNN features; through the crops only if not detached.
    assert g_feat.abs().sum() > 0
    if detach:
        assert g_bb is None
    else:
        assert g_bb.abs().sum() > 0
    g_feat, g_bb = torch.autograd.grad(losses["loss_rcnn_cls"], [features, w], allow_unused=True)
    assert g_feat is None and g_bb.abs().sum() > 0


def test_no_positive_gives_zero_losses_that_touch_every_branch_parameter():
    losses, backbone, _, branch = _tiny_branch_inputs([[3, 3], [-1]])
    assert backbone.batch_sizes == []  # no crop at all
    assert losses["loss_mimic"].item() == 0.0 and losses["loss_rcnn_cls"].item() == 0.0
    (losses["loss_mimic"] + losses["loss_rcnn_cls"]).backward()
    assert all(p.grad is not None for p in branch.parameters())


# --- full models ------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_one_training_iteration_of_each_config(config):
    model = _model(config)
    assert isinstance(model, MimicGeneralizedRCNN) and isinstance(model.roi_heads, MimicROIHeads)
    assert isinstance(model.roi_heads.box_pooler, DeformableROIPooler)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = _train_losses(model, _batch(mask_on="mask_rcnn" in config))
    assert {"loss_mimic", "loss_rcnn_cls", "loss_cls", "loss_box_reg"} <= set(losses)
    assert ("loss_mask" in losses) == ("mask_rcnn" in config)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mimic"] > 0 and losses["loss_rcnn_cls"] > 0
    before = model.roi_heads.mimic.cls_score.weight.detach().clone()
    opt.zero_grad()
    sum(losses.values()).backward()
    opt.step()
    assert not torch.equal(before, model.roi_heads.mimic.cls_score.weight)


def test_both_losses_reach_the_backbone_in_the_detector():
    model = _model(CONFIGS[0])
    losses = _train_losses(model, _batch())
    w = model.backbone.bottom_up.res4[0].conv2.weight  # a deformable conv, trainable
    for name in ("loss_mimic", "loss_rcnn_cls"):
        (g,) = torch.autograd.grad(losses[name], [w], retain_graph=True)
        assert g.abs().sum() > 0, name


def test_own_fcs_are_separate_parameters():
    model = _model(CONFIGS[0], "MODEL.DCNV2.MIMIC.SHARE_HEAD_FCS", "False")
    own, shared = model.roi_heads.mimic.box_head, model.roi_heads.box_head
    assert own is not None and own is not shared
    assert {id(p) for p in own.parameters()}.isdisjoint(id(p) for p in shared.parameters())
    assert model.roi_heads.mimic.cls_score.out_features == 3


def test_eval_is_exactly_the_plain_detector():
    mimic = _model(CONFIGS[0])
    plain = _model(CONFIGS[0], *PLAIN)
    assert type(plain.roi_heads.box_pooler) is type(mimic.roi_heads.box_pooler)  # mdpool
    result = plain.load_state_dict(mimic.state_dict(), strict=False)
    assert not result.missing_keys
    assert result.unexpected_keys and all(
        k.startswith("roi_heads.mimic.") for k in result.unexpected_keys
    )
    inputs = [{k: v for k, v in x.items() if k != "instances"} for x in _batch()]
    with torch.no_grad():
        out_mimic, out_plain = mimic.eval()(inputs), plain.eval()(inputs)
    for a, b in zip(out_mimic, out_plain):
        a, b = a["instances"], b["instances"]
        assert len(a) > 0
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)


def test_misconfigurations_are_clear_errors():
    with pytest.raises(TypeError, match="MimicROIHeads"):
        _model(CONFIGS[0], "MODEL.ROI_HEADS.NAME", "DCNv2StandardROIHeads")
    with pytest.raises(ValueError, match="crop_size"):
        RCNNMimicBranch(feature_dim=8, num_classes=3, crop_size=0)
    with pytest.raises(ValueError, match="size_divisibility"):
        _model(CONFIGS[0], "MODEL.DCNV2.MIMIC.CROP_SIZE", "100")
    heads = _model(CONFIGS[0], "MODEL.META_ARCHITECTURE", "GeneralizedRCNN")
    with pytest.raises(RuntimeError, match="MimicGeneralizedRCNN"):
        _train_losses(heads, _batch())


# The LazyConfig twins with TINY's settings.
LAZY_TINY = [
    "model.backbone.bottom_up.stages.backend=torchvision",
    "model.roi_heads.num_classes=3",
    "model.roi_heads.batch_size_per_image=32",
    "model.roi_heads.box_predictor.test_score_thresh=0.0",
    "model.proposal_generator.pre_nms_topk=[100,100]",
    "model.proposal_generator.post_nms_topk=[50,20]",
    "model.roi_heads.mimic.crop_size=64",
    "model.roi_heads.mimic.num_positives_per_image=3",
    "model.roi_heads.box_pooler.fc_dim=64",
    "model.roi_heads.box_pooler.share_across_levels=True",
]


@pytest.mark.parametrize("config", CONFIGS)
def test_lazy_twin_builds_the_yaml_model_and_its_losses(config):
    yaml_model = _model(config)
    lazy_cfg = load_config("lazy/" + config.replace(".yaml", ".py"), LAZY_TINY)
    lazy_model = instantiate(lazy_cfg.model)
    assert isinstance(lazy_model, MimicGeneralizedRCNN)
    shapes = [{n: p.shape for n, p in m.named_parameters()} for m in (yaml_model, lazy_model)]
    assert shapes[0] == shapes[1]
    lazy_model.load_state_dict(yaml_model.state_dict(), strict=True)
    batch = _batch(mask_on="mask_rcnn" in config)
    losses = []
    for model in (yaml_model, lazy_model):
        torch.manual_seed(5)  # the same proposal and RoI samples
        losses.append(_train_losses(model, batch))
    assert {"loss_mimic", "loss_rcnn_cls"} <= set(losses[0]) and losses[0].keys() == losses[
        1
    ].keys()
    for name, value in losses[0].items():
        torch.testing.assert_close(losses[1][name], value, msg=name)
