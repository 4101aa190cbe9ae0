"""The DCNv2 paper's sampling-location pictures (arXiv 1811.11168, Fig. 1 and 3): image
positions traced back through stacked deformable layers, weighted by the modulations' product.
Positions are ``(y, x)`` image pixels; the first deformable group is used.
"""

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.modeling.backbone.resnet import ResNet
from torch import nn
from torch.nn import functional as F

from ..data import build_test_augmentation
from ..errors import UserInputError
from ..layers import DeformConv, ModulatedDeformConv


@dataclass
class DeformableLayerRecord:
    """What one deformable conv did on one image.

    Attributes:
        offset (Tensor): (2*kh*kw, Ho, Wo), (dy, dx) of tap ``k = i*kw + j`` in channels
            ``2k, 2k+1``, in input cells.
        mask (Tensor): (kh*kw, Ho, Wo), ones for DCNv1.
    """

    name: str
    offset: torch.Tensor
    mask: torch.Tensor
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    in_stride: int

    @property
    def out_stride(self) -> int:
        """Stride of the conv's output (and offset field), in image pixels."""
        return self.in_stride * self.stride[0]


def find_resnet(model: nn.Module) -> ResNet:
    """The detectron2 ``ResNet`` inside ``model``; UserInputError when there is none."""
    for module in model.modules():
        if isinstance(module, ResNet):
            return module
    raise UserInputError(
        f"{type(model).__name__} has no detectron2 ResNet backbone with deformable layers"
    )


def deformable_layers(resnet: ResNet) -> List[Tuple[str, nn.Module, int]]:
    """``(name, conv, in_stride)`` of each deformable conv of a ResNet, in execution order."""
    names = {module: name for name, module in resnet.named_modules()}
    layers = []
    stride = resnet.stem.stride
    for stage in resnet.stages:
        for block in stage:
            stride *= block.stride
            for module in block.modules():
                if isinstance(module, (DeformConv, ModulatedDeformConv)):
                    # The block's stride sits either in this conv or before it (stride_in_1x1):
                    # the conv's output has the block's output stride either way.
                    layers.append((names[module], module, stride // module.stride[0]))
    return layers


@contextlib.contextmanager
def record_deformable_layers(
    model: nn.Module, batch_index: int = 0
) -> Iterator[List[DeformableLayerRecord]]:
    """Yields the list of :class:`DeformableLayerRecord` of ``model``'s ResNet, filled in
    execution order by each forward inside the block."""
    resnet = find_resnet(model)
    layers = deformable_layers(resnet)
    if not layers:
        raise UserInputError(
            "the model's ResNet has no deformable layer (MODEL.RESNETS.DEFORM_ON_PER_STAGE is "
            "all False): nothing to visualise"
        )
    records: List[DeformableLayerRecord] = []

    def hook(name, in_stride, module, args, kwargs, output):
        if name == layers[0][0]:  # a new forward
            records.clear()
        values = [*args[1:], *(kwargs[k] for k in ("offset", "mask") if k in kwargs), None]
        offset, mask = values[0][batch_index], values[1]
        taps = module.kernel_size[0] * module.kernel_size[1]
        mask = torch.ones((taps,) + offset.shape[1:]) if mask is None else mask[batch_index]
        records.append(
            DeformableLayerRecord(
                name=name,
                offset=offset[: 2 * taps].detach().float().cpu(),
                mask=mask[:taps].detach().float().cpu(),
                kernel_size=tuple(module.kernel_size),
                stride=tuple(module.stride),
                padding=tuple(module.padding),
                dilation=tuple(module.dilation),
                in_stride=in_stride,
            )
        )

    with contextlib.ExitStack() as hooks:
        for name, module, in_stride in layers:
            hook_of_layer = functools.partial(hook, name, in_stride)
            hooks.enter_context(module.register_forward_hook(hook_of_layer, with_kwargs=True))
        yield records


def _bilinear(field: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``field`` (C, H, W) sampled bilinearly at cells ``y``, ``x`` (shape S, clamped): (C, *S)."""
    h, w = field.shape[-2:]
    grid = torch.stack([x * 2 / max(w - 1, 1) - 1, y * 2 / max(h - 1, 1) - 1], dim=-1)
    return F.grid_sample(field[None], grid[None], padding_mode="border", align_corners=True)[0]


def trace_sampling_locations(
    layers: Sequence[DeformableLayerRecord], points: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Trace ``points`` (P, 2) ``(y, x)`` back through ``layers`` (execution order).

    Returns:
        (locations, weights): (P, T, 2) positions, ``T = prod(kh*kw)``, and (P, T) weights.
    """
    points = torch.as_tensor(points, dtype=torch.float64)
    if points.dim() != 2 or points.shape[1] != 2:
        raise ValueError(f"points must be (P, 2) (y, x) positions, got shape {tuple(points.shape)}")
    locations = points[:, None, :]  # (P, M=1, 2)
    weights = torch.ones(points.shape[0], 1, dtype=torch.float64)
    for layer in reversed(layers):
        kh, kw = layer.kernel_size
        cells = locations / layer.out_stride
        fy, fx = cells[..., 0], cells[..., 1]
        offset = _bilinear(layer.offset.double(), fy, fx)  # (2*taps, P, M)
        mask = _bilinear(layer.mask.double(), fy, fx)  # (taps, P, M)
        dy, dx = offset[0::2].permute(1, 2, 0), offset[1::2].permute(1, 2, 0)  # (P, M, taps)
        ty = torch.arange(kh, dtype=torch.float64).repeat_interleave(kw)
        tx = torch.arange(kw, dtype=torch.float64).repeat(kh)
        # Input cell of tap k: out * stride - pad + tap * dilation + learned offset.
        in_y = fy[..., None] * layer.stride[0] - layer.padding[0] + ty * layer.dilation[0] + dy
        in_x = fx[..., None] * layer.stride[1] - layer.padding[1] + tx * layer.dilation[1] + dx
        locations = torch.stack([in_y, in_x], dim=-1).flatten(1, 2) * layer.in_stride
        weights = (weights[..., None] * mask.permute(1, 2, 0)).flatten(1, 2)
    return locations, weights


def randomize_offsets(
    model: nn.Module, inputs: List[dict], offset_rms: float, seed: int = 0, mask_logit_rms=2.0
) -> int:
    """Give the offset/mask predictors random weights scaled to offsets of about ``offset_rms``
    cells and mask logits of about ``mask_logit_rms`` on ``inputs`` (untrained weights give a
    regular grid); returns how many predictors changed."""
    predictors = [
        module
        for name, module in find_resnet(model).named_modules()
        if name.endswith("conv2_offset") and isinstance(module, nn.Conv2d)
    ]
    energy = {}

    def hook(module, args, output):
        x = args[0].detach().double()
        # C * kh * kw products per output value
        energy[module] = float((x**2).mean()) * x.shape[1] * module.weight[0, 0].numel()

    with contextlib.ExitStack() as hooks, torch.no_grad():
        for module in predictors:
            hooks.enter_context(module.register_forward_hook(hook))
        model(inputs)
    generator = torch.Generator().manual_seed(seed)
    for module in predictors:
        weight = torch.randn(module.weight.shape, generator=generator, dtype=torch.float64)
        # The first 2/3 of the channels are offsets, the rest mask logits (DCNv2 layout);
        # DCNv1 predictors have offsets only.
        channels = weight.shape[0]
        num_offsets = channels * 2 // 3 if channels % 27 == 0 else channels
        scale = torch.full((channels, 1, 1, 1), mask_logit_rms, dtype=torch.float64)
        scale[:num_offsets] = offset_rms
        weight *= scale / max(energy[module], 1e-12) ** 0.5
        with torch.no_grad():
            module.weight.copy_(weight)
            if module.bias is not None:
                module.bias.zero_()
    return len(predictors)


def sample_image(
    model: nn.Module,
    cfg,
    image_bgr: np.ndarray,
    points_xy: Optional[Sequence[Tuple[float, float]]] = None,
    max_boxes: int = 3,
    num_layers: int = 3,
    random_offsets: float = 0.0,
    seed: int = 0,
) -> dict:
    """Run a detector on one (H, W, 3) uint8 BGR image and trace the last ``num_layers``
    deformable layers.

    Args:
        points_xy: ``(x, y)`` pixels of ``image_bgr``; default the centres of the top
            ``max_boxes`` detections.
        random_offsets: if > 0, :func:`randomize_offsets` with this RMS first.

    Returns:
        dict (numpy, ``(y, x)``): ``image_rgb``, ``points`` (P, 2), ``locations`` (P, T, 2),
        ``weights`` (P, T), ``layers``, ``scale`` at the network's resolution, and
        ``input_image_rgb``, ``input_points``, ``input_locations`` at the input's.
    """
    from detectron2.data import transforms as T

    height, width = image_bgr.shape[:2]
    if points_xy is not None:
        for x, y in points_xy:
            if not (0 <= x < width and 0 <= y < height):
                raise UserInputError(
                    f"point ({x}, {y}) is outside the {width}x{height} image; give x,y pixels"
                )
    aug_input = T.AugInput(image_bgr)
    T.AugmentationList(build_test_augmentation(cfg))(aug_input)
    resized = aug_input.image
    scale = resized.shape[0] / height
    net_input = resized[:, :, ::-1] if cfg.INPUT.FORMAT == "RGB" else resized
    tensor = torch.as_tensor(np.ascontiguousarray(net_input.transpose(2, 0, 1)).astype("float32"))
    h, w = resized.shape[:2]
    inputs = [{"image": tensor, "height": h, "width": w}]
    if random_offsets > 0:
        randomize_offsets(model, inputs, random_offsets, seed)
    with record_deformable_layers(model) as records, torch.no_grad():
        outputs = model(inputs)
    layers = list(records)
    if not 1 <= num_layers <= len(layers):
        raise UserInputError(
            f"--layers must be between 1 and {len(layers)} (the model's deformable layers), "
            f"got {num_layers}"
        )
    if points_xy is None:
        instances = outputs[0]["instances"].to("cpu")
        if len(instances) == 0:
            raise UserInputError(
                "the model detected nothing to take box centres from: give --points or lower "
                "--confidence-threshold"
            )
        top = instances.scores.argsort(descending=True)[:max_boxes]
        centres = instances.pred_boxes.get_centers()[top]  # (P, 2) as (x, y), network pixels
        points = centres[:, [1, 0]].double()
        input_points = points.numpy() / scale
    else:  # input_points exactly as asked for, not a rescaled round trip
        input_points = np.array([[y, x] for x, y in points_xy], dtype=np.float64)
        points = torch.from_numpy(input_points * scale)
    traced = layers[-num_layers:]
    locations, weights = trace_sampling_locations(traced, points)
    return {
        "image_rgb": np.ascontiguousarray(resized[:, :, ::-1]),
        "points": points.numpy(),
        "locations": locations.numpy(),
        "weights": weights.numpy(),
        "layers": [layer.name for layer in traced],
        "scale": scale,
        "input_image_rgb": np.ascontiguousarray(image_bgr[:, :, ::-1]),
        "input_points": input_points,
        "input_locations": locations.numpy() / scale,
    }


def plot_sampling_locations(
    image_rgb: np.ndarray,
    points: np.ndarray,
    locations: np.ndarray,
    weights: np.ndarray,
    path: str,
    title: Optional[str] = None,
    dpi: int = 100,
) -> None:
    """Save a PNG, one row per point: locations coloured by weight, and sized by it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num = len(points)
    h, w = image_rgb.shape[:2]
    fig_w = 11.0
    fig, axes = plt.subplots(
        num, 2, figsize=(fig_w, fig_w / 2 * h / w * num + 0.6 * (title is not None)), squeeze=False
    )
    vmax = float(weights.max()) if weights.size else 1.0
    for row, (point, locs, wts) in enumerate(zip(points, locations, weights)):
        order = np.argsort(wts)  # heaviest drawn last, on top
        left, right = axes[row]
        for ax in (left, right):
            ax.imshow(image_rgb)
            ax.set(xlim=(0, w - 1), ylim=(h - 1, 0), xticks=[], yticks=[])
            star = {"marker": "*", "s": 160, "c": "lime", "edgecolors": "black"}
            ax.scatter([point[1]], [point[0]], zorder=3, **star)  # over the locations
        scatter = left.scatter(
            locs[order, 1], locs[order, 0], c=wts[order], s=6, cmap="plasma", vmin=0, vmax=vmax
        )
        rel = (wts / (wts.max() if wts.max() > 0 else 1.0))[order]
        right.scatter(
            locs[order, 1], locs[order, 0], s=2 + 40 * rel, c="red", alpha=0.1 + 0.9 * rel
        )
        fig.colorbar(scatter, ax=left, fraction=0.035, pad=0.01, label="modulation (product)")
        left.set_title(f"({point[1]:.0f}, {point[0]:.0f}): {locs.shape[0]} sampling locations")
        right.set_title("effective sampling locations (size, opacity = weight)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
