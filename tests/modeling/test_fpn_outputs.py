"""``fpn_outputs``: some outputs of an FPN, equal to the whole forward's, without running the
output convs (and the top-down steps) of the levels not asked for; and the mimicking branch,
which runs only the level its pooler reads for the crops, against the whole forward."""

import pytest
import torch
from detectron2.modeling import build_backbone, build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

import dcnv2
from dcnv2.modeling.fpn import fpn_outputs
from dcnv2.modeling.mimic import RCNNMimicBranch

CONFIG = "faster_rcnn_R50_mdconv_mdpool_mimic_FPN_1x.yaml"
TINY = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.DCNV2.BACKEND", "torchvision",
    "MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "100", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
    "MODEL.DCNV2.MIMIC.NUM_POSITIVES_PER_IMAGE", "2", "MODEL.DCNV2.MDPOOL.FC_DIM", "32",
]  # fmt: skip


@pytest.fixture(scope="module")
def fpn():
    torch.manual_seed(0)
    backbone = build_backbone(dcnv2.get_cfg(CONFIG, TINY)).eval()
    # Non-zero random weights everywhere, so that a wrong path cannot match by accident.
    for p in backbone.parameters():
        p.data.normal_(0, 0.05)
    return backbone


def test_each_output_equals_the_whole_forward(fpn):
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        full = fpn(x)
        for names in (["p2"], ["p3"], ["p4"], ["p5"], ["p5", "p3"], ["p6"], ["p4", "p6"]):
            out = fpn_outputs(fpn, x, names)
            assert list(out) == names
            for name in names:
                assert full[name].abs().max() > 0
                torch.testing.assert_close(out[name], full[name], atol=0, rtol=0)


def test_only_the_output_convs_asked_for_run(fpn):
    ran = []
    hooks = [
        conv.register_forward_hook(lambda m, i, o, k=k: ran.append(k))
        for k, conv in enumerate(fpn.output_convs)  # coarsest first: p5, p4, p3, p2
    ]
    try:
        with torch.no_grad():
            fpn_outputs(fpn, torch.randn(1, 3, 64, 64), ["p4"])
            assert ran == [1]
            ran.clear()
            fpn(torch.randn(1, 3, 64, 64))
            assert sorted(ran) == [0, 1, 2, 3]
    finally:
        for h in hooks:
            h.remove()


def test_other_backbones_run_their_whole_forward():
    class Plain(nn.Module):
        def forward(self, x):
            return {"a": x + 1, "b": x * 2}

    x = torch.randn(1, 3, 4, 4)
    out = fpn_outputs(Plain(), x, ["b"])
    assert list(out) == ["b"] and torch.equal(out["b"], x * 2)


def _batch():
    g = torch.Generator().manual_seed(0)
    inst = Instances((128, 160))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 90.0, 100.0], [60.0, 20.0, 150.0, 70.0]]))
    inst.gt_classes = torch.tensor([1, 2])
    image = torch.randint(0, 256, (3, 128, 160), generator=g).float()
    return [{"image": image, "instances": inst}]


def _all_levels(self, crops, backbone, box_pooler, in_features):
    """The crops' maps of the whole backbone forward, every level."""
    maps = backbone(crops)
    return [maps[f] for f in in_features]


@pytest.mark.parametrize("crop_size", [128, 256])  # pooled from p3 and from p4
def test_mimic_losses_and_gradients_equal_those_of_the_whole_forward(crop_size, monkeypatch):
    cfg = dcnv2.get_cfg(CONFIG, TINY + ["MODEL.DCNV2.MIMIC.CROP_SIZE", str(crop_size)])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    for p in model.roi_heads.box_pooler.parameters():  # trained mdpool branches
        p.data.normal_(0, 0.02)
    results = []
    for crop_maps in (None, _all_levels):
        if crop_maps is not None:
            monkeypatch.setattr(RCNNMimicBranch, "_crop_maps", crop_maps)
        model.zero_grad()
        torch.manual_seed(1)
        with EventStorage():
            losses = model(_batch())
        (losses["loss_mimic"] + losses["loss_rcnn_cls"]).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((losses, grads))
    (losses, grads), (ref_losses, ref_grads) = results
    assert ref_losses["loss_rcnn_cls"] > 0 and ref_losses["loss_mimic"] > 0
    for name in ("loss_mimic", "loss_rcnn_cls"):
        torch.testing.assert_close(losses[name], ref_losses[name], atol=1e-6, rtol=1e-6)
    assert grads.keys() == ref_grads.keys()
    assert ref_grads["backbone.bottom_up.res4.0.conv2.weight"].abs().sum() > 0
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)
