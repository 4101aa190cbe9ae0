"""ResNet / ResNeXt backbones with (modulated) deformable 3x3 convolutions in chosen stages.

detectron2's ``DeformBottleneckBlock`` names (its checkpoints load), in detectron2's ``ResNet``.
"""

from typing import List, Sequence

from detectron2.layers import CNNBlockBase, Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import (
    BasicStem,
    BottleneckBlock,
    DeformBottleneckBlock,
    ResNet,
)
from fvcore.nn import weight_init
from torch import nn

from ..layers import DeformConv, ModulatedDeformConv

__all__ = ["DCNv2BottleneckBlock", "make_dcnv2_stages", "build_dcnv2_resnet_backbone"]

_BLOCKS_PER_STAGE = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


class DCNv2BottleneckBlock(DeformBottleneckBlock):
    """detectron2's ``DeformBottleneckBlock`` with this plugin's deformable conv as ``conv2``.

    The constructor is detectron2's written out (same weights for one seed), since
    detectron2's own instantiates convs a build without compiled ops refuses.

    Args:
        deform_modulated: True for DCNv2, False for DCNv1.
        backend: deformable-conv backend, see :mod:`dcnv2.layers.backends`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        bottleneck_channels: int,
        stride: int = 1,
        num_groups: int = 1,
        norm: str = "BN",
        stride_in_1x1: bool = False,
        dilation: int = 1,
        deform_modulated: bool = True,
        deform_num_groups: int = 1,
        backend: str = "auto",
    ):
        CNNBlockBase.__init__(self, in_channels, out_channels, stride)  # not detectron2's, above
        self.deform_modulated = deform_modulated

        def conv_norm(conv_class, c_in, c_out, *args, **kwargs):
            return conv_class(c_in, c_out, *args, bias=False, norm=get_norm(norm, c_out), **kwargs)

        self.shortcut = None
        if in_channels != out_channels:
            self.shortcut = conv_norm(Conv2d, in_channels, out_channels, 1, stride=stride)
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv_norm(Conv2d, in_channels, bottleneck_channels, 1, stride=stride_1x1)
        # Per deformable group: 18 offsets (dy, dx for 9 taps), plus 9 mask logits for DCNv2.
        self.conv2_offset = Conv2d(
            bottleneck_channels,
            (27 if deform_modulated else 18) * deform_num_groups,
            kernel_size=3,
            stride=stride_3x3,
            padding=dilation,
            dilation=dilation,
        )
        self.conv2 = conv_norm(
            ModulatedDeformConv if deform_modulated else DeformConv,
            bottleneck_channels,
            bottleneck_channels,
            kernel_size=3,
            stride=stride_3x3,
            padding=dilation,
            groups=num_groups,
            dilation=dilation,
            deformable_groups=deform_num_groups,
            backend=backend,
        )
        self.conv3 = conv_norm(Conv2d, bottleneck_channels, out_channels, 1)
        for layer in (self.conv1, self.conv2, self.conv3, self.shortcut):
            if layer is not None:
                weight_init.c2_msra_fill(layer)
        nn.init.constant_(self.conv2_offset.weight, 0)
        nn.init.constant_(self.conv2_offset.bias, 0)


def make_dcnv2_stages(
    *,
    depth: int = 50,
    deform_on_per_stage: Sequence[bool] = (False, True, True, True),
    deform_modulated: bool = True,
    deform_num_groups: int = 1,
    num_groups: int = 1,
    width_per_group: int = 64,
    in_channels: int = 64,
    out_channels: int = 256,
    stride_in_1x1: bool = True,
    res5_dilation: int = 1,
    norm: str = "FrozenBN",
    backend: str = "auto",
) -> List[List[CNNBlockBase]]:
    """The four stages (res2-res5) of a ResNet/ResNeXt with deformable 3x3 convs where asked.

    Keyword-only for ``L(ResNet)(stem=..., stages=L(make_dcnv2_stages)(depth=50), ...)``.

    Args:
        deform_on_per_stage: four booleans, res2 to res5.
        in_channels: channels out of the stem; out_channels: channels out of res2.
        stride_in_1x1: True for caffe2/MSRA-style weights, False for pytorch-style ones.
        res5_dilation: 1 or 2 (then res5 keeps stride 16).
    """
    if depth not in _BLOCKS_PER_STAGE:
        raise ValueError(
            f"ResNet depth {depth} is not supported with deformable convs; expected one of "
            f"{sorted(_BLOCKS_PER_STAGE)} (R18/R34 have no bottleneck 3x3 to deform)"
        )
    if len(deform_on_per_stage) != 4:
        raise ValueError(
            f"deform_on_per_stage needs 4 booleans (res2..res5), got {list(deform_on_per_stage)}"
        )
    if res5_dilation not in (1, 2):
        raise ValueError(f"res5_dilation must be 1 or 2, got {res5_dilation}")
    bottleneck_channels = num_groups * width_per_group
    deform = dict(block_class=DCNv2BottleneckBlock, deform_modulated=deform_modulated,
                  deform_num_groups=deform_num_groups, backend=backend)  # fmt: skip
    stages = []
    for idx, num_blocks in enumerate(_BLOCKS_PER_STAGE[depth]):
        dilation = res5_dilation if idx == 3 else 1
        first_stride = 1 if idx == 0 or dilation == 2 else 2
        stages.append(
            ResNet.make_stage(
                num_blocks=num_blocks,
                stride_per_block=[first_stride] + [1] * (num_blocks - 1),
                in_channels=in_channels,
                out_channels=out_channels,
                bottleneck_channels=bottleneck_channels,
                num_groups=num_groups,
                norm=norm,
                stride_in_1x1=stride_in_1x1,
                dilation=dilation,
                **(deform if deform_on_per_stage[idx] else dict(block_class=BottleneckBlock)),
            )
        )
        in_channels = out_channels
        out_channels *= 2
        bottleneck_channels *= 2
    return stages


@BACKBONE_REGISTRY.register()
def build_dcnv2_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """detectron2's ResNet with deformable convs, from ``MODEL.RESNETS`` and ``MODEL.DCNV2``."""
    r = cfg.MODEL.RESNETS
    stem = BasicStem(input_shape.channels, r.STEM_OUT_CHANNELS, r.NORM)
    stages = make_dcnv2_stages(
        depth=r.DEPTH,
        deform_on_per_stage=r.DEFORM_ON_PER_STAGE,
        deform_modulated=r.DEFORM_MODULATED,
        deform_num_groups=r.DEFORM_NUM_GROUPS,
        num_groups=r.NUM_GROUPS,
        width_per_group=r.WIDTH_PER_GROUP,
        in_channels=r.STEM_OUT_CHANNELS,
        out_channels=r.RES2_OUT_CHANNELS,
        stride_in_1x1=r.STRIDE_IN_1X1,
        res5_dilation=r.RES5_DILATION,
        norm=r.NORM,
        backend=cfg.MODEL.DCNV2.BACKEND,
    )
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
