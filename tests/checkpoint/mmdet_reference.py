"""A stand-in for MMDetection's two-stage detectors, written from MMDetection's and mmcv's model
definitions (not from dcnv2's model), so tests can build checkpoints with MMDetection's exact
tensor names and shapes and compute what MMDetection's layers compute.

Sources read: mmdet/models/backbones/resnet.py (ResNet, Bottleneck: conv1/bn1, conv2/bn2,
conv3/bn3, ``downsample`` = Sequential(conv, bn), style 'pytorch' strides the 3x3, stem conv1 7x7
+ bn1 + maxpool 3/2), mmdet/models/layers/res_layer.py (ResLayer), mmcv's
ModulatedDeformConv2dPack (``conv_offset`` with 3*dg*k*k channels, chunked into o1, o2, mask;
offset = cat(o1, o2), mask = sigmoid) and DeformConv2dPack (2*dg*k*k), mmdet/models/necks/fpn.py
(``lateral_convs``/``fpn_convs`` ConvModules named ``conv``, nearest top-down upsampling, P6 by
max_pool2d(kernel 1, stride 2)), rpn_head.py (``rpn_conv`` 3x3 + ReLU, ``rpn_cls``, ``rpn_reg``),
convfc_bbox_head.py (Shared2FCBBoxHead: ``shared_fcs`` + ReLU, ``fc_cls`` K+1, ``fc_reg`` 4K),
fcn_mask_head.py (``convs`` ConvModules + ReLU, ``upsample`` ConvTranspose2d 2x2/2 + ReLU,
``conv_logits``), anchor_generator.py, delta_xywh_bbox_coder.py and single_level_roi_extractor.py.
"""

import math
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d

BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class ConvModule(nn.Module):
    """mmcv ConvModule without a norm layer: a ``conv`` (with bias), optional ReLU."""

    def __init__(self, in_c, out_c, k, padding=0, relu=False):
        super().__init__()
        self.conv = nn.Conv2d(in_c, out_c, k, padding=padding)
        self.relu = relu

    def forward(self, x):
        x = self.conv(x)
        return F.relu(x) if self.relu else x


class DeformConvPack(nn.Module):
    """mmcv ModulatedDeformConv2dPack ('DCNv2') or DeformConv2dPack ('DCN'), bias=False."""

    def __init__(self, in_c, out_c, stride, groups, deform_groups, modulated):
        super().__init__()
        self.stride, self.modulated = stride, modulated
        self.weight = nn.Parameter(torch.empty(out_c, in_c // groups, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=1)
        per_group = 27 if modulated else 18
        self.conv_offset = nn.Conv2d(in_c, deform_groups * per_group, 3, stride, padding=1)

    def forward(self, x):
        out = self.conv_offset(x)
        mask = None
        if self.modulated:
            o1, o2, mask = torch.chunk(out, 3, dim=1)
            out, mask = torch.cat((o1, o2), dim=1), mask.sigmoid()
        return deform_conv2d(x, out, self.weight, stride=self.stride, padding=1, mask=mask)


class Bottleneck(nn.Module):
    def __init__(self, inplanes, planes, width, stride, groups, dcn, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        if dcn is None:
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        else:
            self.conv2 = DeformConvPack(width, width, stride, groups, **dcn)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet(nn.Module):
    """mmdet ResNet (depth 50/101) or ResNeXt (groups, base_width), style 'pytorch'."""

    def __init__(self, depth=50, groups=1, base_width=64, dcn=None, stage_with_dcn=(False,) * 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        inplanes = 64
        for i, num_blocks in enumerate(BLOCKS[depth]):
            planes = 64 * 2**i
            # mmdet ResNeXt: width = floor(planes * base_width / 64) * groups
            width = planes if groups == 1 else math.floor(planes * base_width / 64) * groups
            stride = 1 if i == 0 else 2
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
            stage_dcn = dcn if stage_with_dcn[i] else None
            blocks = [Bottleneck(inplanes, planes, width, stride, groups, stage_dcn, downsample)]
            blocks += [
                Bottleneck(planes * 4, planes, width, 1, groups, stage_dcn, None)
                for _ in range(num_blocks - 1)
            ]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes * 4

    def forward(self, x) -> List[torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            outs.append(x)
        return outs


class FPN(nn.Module):
    def __init__(self, in_channels=(256, 512, 1024, 2048), out_channels=256):
        super().__init__()
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            ConvModule(out_channels, out_channels, 3, padding=1) for _ in in_channels
        )

    def forward(self, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            size = laterals[i - 1].shape[2:]
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=size, mode="nearest"
            )
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs


class RPNHead(nn.Module):
    def __init__(self, channels=256, num_anchors=3):
        super().__init__()
        self.rpn_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(channels, num_anchors * 4, 1)

    def forward(self, x):
        x = F.relu(self.rpn_conv(x))
        return self.rpn_cls(x), self.rpn_reg(x)


class Shared2FCBBoxHead(nn.Module):
    def __init__(self, num_classes=80, in_channels=256, fc=1024):
        super().__init__()
        self.shared_fcs = nn.ModuleList([nn.Linear(in_channels * 49, fc), nn.Linear(fc, fc)])
        self.fc_cls = nn.Linear(fc, num_classes + 1)  # background is index num_classes
        self.fc_reg = nn.Linear(fc, 4 * num_classes)

    def forward(self, x):
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class FCNMaskHead(nn.Module):
    def __init__(self, num_classes=80, channels=256):
        super().__init__()
        self.convs = nn.ModuleList(
            ConvModule(channels, channels, 3, padding=1, relu=True) for _ in range(4)
        )
        self.upsample = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(F.relu(self.upsample(x)))


class RoIHead(nn.Module):
    def __init__(self, num_classes, mask):
        super().__init__()
        self.bbox_head = Shared2FCBBoxHead(num_classes)
        if mask:
            self.mask_head = FCNMaskHead(num_classes)


class TwoStageDetector(nn.Module):
    """``state_dict()`` has the names of MMDetection's FasterRCNN / MaskRCNN."""

    def __init__(self, mask=False, num_classes=80, **backbone):
        super().__init__()
        self.backbone = ResNet(**backbone)
        self.neck = FPN()
        self.rpn_head = RPNHead()
        self.roi_head = RoIHead(num_classes, mask)


def mdconv_c3_c5(mask=False, deform_groups=1, **kwargs) -> TwoStageDetector:
    """faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco (``mask``: mask-rcnn_r50-mdconv-c3-c5_...)."""
    return TwoStageDetector(
        mask=mask,
        dcn=dict(deform_groups=deform_groups, modulated=True),
        stage_with_dcn=(False, True, True, True),
        **kwargs,
    )


def randomize_(model: nn.Module, seed: int = 0, offset_std: float = 0.02) -> nn.Module:
    """Random values everywhere, scaled so activations stay O(1) through the network:
    BN statistics and affine terms, small offset/mask convs (sub-pixel, non-integer offsets)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.5 + 0.5 * torch.rand(n, generator=g))
                module.bias.copy_(0.1 * torch.randn(n, generator=g))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                module.running_var.copy_(0.5 + torch.rand(n, generator=g))
                module.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
            elif name.endswith("conv_offset"):
                module.weight.copy_(offset_std * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=g))
            elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, DeformConvPack)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) / fan_in**0.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
    return model.eval()


def anchors(stride: int, feat_h: int, feat_w: int, scales=(8,), ratios=(0.5, 1.0, 2.0)):
    """mmdet AnchorGenerator.single_level_grid_priors (center_offset 0, scale_major)."""
    ratios, scales = torch.tensor(ratios), torch.tensor(scales, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (stride * w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (stride * h_ratios[:, None] * scales[None, :]).view(-1)
    base = torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)
    shift_x = torch.arange(feat_w, dtype=torch.float32) * stride
    shift_y = torch.arange(feat_h, dtype=torch.float32) * stride
    xx, yy = shift_x.repeat(feat_h), shift_y.view(-1, 1).repeat(1, feat_w).view(-1)
    shifts = torch.stack([xx, yy, xx, yy], dim=-1)
    return (base[None] + shifts[:, None]).view(-1, 4)


def delta2bbox(rois, deltas, stds, max_shape=None, wh_ratio_clip=16 / 1000):
    """mmdet DeltaXYWHBBoxCoder.decode (means 0); deltas (N, 4 * C)."""
    n, c = deltas.shape[0], deltas.shape[1] // 4
    d = deltas.reshape(-1, 4) * deltas.new_tensor(stds)
    r = rois.repeat(1, c).reshape(-1, 4)
    pxy, pwh = (r[:, :2] + r[:, 2:]) * 0.5, r[:, 2:] - r[:, :2]
    max_ratio = abs(math.log(wh_ratio_clip))
    gxy = pxy + pwh * d[:, :2]
    gwh = pwh * d[:, 2:].clamp(min=-max_ratio, max=max_ratio).exp()
    boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
    if max_shape is not None:
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, max_shape[1])
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, max_shape[0])
    return boxes.reshape(n, -1)


def map_roi_levels(boxes, num_levels=4, finest_scale=56):
    """mmdet SingleRoIExtractor.map_roi_levels (0-based level among P2..P5)."""
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()
