"""Image resizing as detectron2 (PIL) or MMDetection (OpenCV) does it, and augmentation builders."""

import sys
from typing import List, Sequence, Tuple, Union

import numpy as np
from detectron2.data import transforms as T
from detectron2.data.transforms import Transform

from ..errors import DCNv2Error

__all__ = [
    "RESIZE_BACKENDS",
    "OpenCVResizeShortestEdge",
    "OpenCVResizeTransform",
    "ResizeBackendError",
    "build_test_augmentation",
    "build_train_augmentation",
    "mmdet_rescale_size",
]

# INPUT.DCNV2.RESIZE_BACKEND values: detectron2's resize (PIL) or MMDetection's (OpenCV).
RESIZE_BACKENDS = ("pil", "opencv")


class ResizeBackendError(DCNv2Error, ValueError):
    """``INPUT.DCNV2.RESIZE_BACKEND`` is unknown, or names OpenCV where it is not installed."""


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ResizeBackendError(
            "INPUT.DCNV2.RESIZE_BACKEND is 'opencv' but OpenCV is not installed: "
            "pip install opencv-python-headless (or set INPUT.DCNV2.RESIZE_BACKEND pil)"
        ) from None
    return cv2


def mmdet_rescale_size(h: int, w: int, short: float, long: float) -> Tuple[int, int]:
    """(new_h, new_w) of MMDetection's keep-ratio resize of ``h x w`` to ``(long, short)``."""
    factor = min(long / max(h, w), short / min(h, w))
    return int(h * float(factor) + 0.5), int(w * float(factor) + 0.5)


class OpenCVResizeTransform(Transform):
    """detectron2's ``ResizeTransform`` with ``cv2.resize``, as MMDetection's ``Resize``."""

    def __init__(self, h: int, w: int, new_h: int, new_w: int):
        super().__init__()
        self._set_attributes(locals())

    def _resize(self, img: np.ndarray, interpolation: int) -> np.ndarray:
        if img.shape[:2] != (self.h, self.w):
            raise ValueError(
                f"OpenCVResizeTransform for {self.h}x{self.w} images got an image of shape "
                f"{img.shape}"
            )
        out = _cv2().resize(
            np.ascontiguousarray(img), (self.new_w, self.new_h), interpolation=interpolation
        )
        if img.ndim == 3 and out.ndim == 2:  # OpenCV drops a single channel
            out = out[:, :, None]
        return out

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        """(H, W) or (H, W, C) image (uint8 or float) -> (new_h, new_w[, C]), same dtype."""
        return self._resize(img, _cv2().INTER_LINEAR)

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        """(H, W) label map or mask -> (new_h, new_w), nearest neighbour (as MMDetection)."""
        if segmentation.dtype == bool:  # OpenCV does not resize boolean arrays
            return self._resize(segmentation.view(np.uint8), _cv2().INTER_NEAREST).view(bool)
        return self._resize(segmentation, _cv2().INTER_NEAREST)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """(N, 2) ``(x, y)`` points, scaled by ``new_w / w`` and ``new_h / h``."""
        coords[:, 0] = coords[:, 0] * (self.new_w * 1.0 / self.w)
        coords[:, 1] = coords[:, 1] * (self.new_h * 1.0 / self.h)
        return coords

    def inverse(self) -> "OpenCVResizeTransform":
        return OpenCVResizeTransform(self.new_h, self.new_w, self.h, self.w)


class OpenCVResizeShortestEdge(T.Augmentation):
    """MMDetection's keep-ratio resize, ``short`` drawn as detectron2's ``ResizeShortestEdge``."""

    def __init__(
        self,
        short_edge_length: Union[int, Sequence[int]],
        max_size: int = sys.maxsize,
        sample_style: str = "range",
    ):
        super().__init__()
        if sample_style not in ("range", "choice"):
            raise ValueError(f"sample_style must be 'range' or 'choice', got {sample_style!r}")
        if isinstance(short_edge_length, int):
            short_edge_length = (short_edge_length, short_edge_length)
        short_edge_length = tuple(short_edge_length)
        if sample_style == "range" and len(short_edge_length) != 2:
            raise ValueError(f"sample_style 'range' takes [min, max], got {short_edge_length}")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        h, w = image.shape[:2]
        if self.sample_style == "range":
            short = np.random.randint(self.short_edge_length[0], self.short_edge_length[1] + 1)
        else:
            short = np.random.choice(self.short_edge_length)
        if short == 0:
            return T.NoOpTransform()
        new_h, new_w = mmdet_rescale_size(h, w, float(short), float(self.max_size))
        return OpenCVResizeTransform(h, w, new_h, new_w)


def _backend(cfg) -> str:
    backend = cfg.INPUT.get("DCNV2", {}).get("RESIZE_BACKEND", "pil")
    if backend not in RESIZE_BACKENDS:
        raise ResizeBackendError(
            f"INPUT.DCNV2.RESIZE_BACKEND is {backend!r}; expected one of "
            + ", ".join(repr(b) for b in RESIZE_BACKENDS)
        )
    if backend == "opencv":
        _cv2()
    return backend


def _resize(cfg, short: Sequence[int], max_size: int, sample_style: str) -> T.Augmentation:
    if _backend(cfg) == "opencv":
        return OpenCVResizeShortestEdge(short, max_size, sample_style)
    return T.ResizeShortestEdge(short, max_size, sample_style)


def build_test_augmentation(cfg) -> List[T.Augmentation]:
    """The test resize with ``INPUT.DCNV2.RESIZE_BACKEND``'s method."""
    size = cfg.INPUT.MIN_SIZE_TEST
    return [_resize(cfg, [size, size], cfg.INPUT.MAX_SIZE_TEST, "choice")]


def build_train_augmentation(cfg) -> List[T.Augmentation]:
    """``DatasetMapper(cfg, True)``'s augmentation with ``INPUT.DCNV2.RESIZE_BACKEND``."""
    augmentation = [
        _resize(
            cfg,
            cfg.INPUT.MIN_SIZE_TRAIN,
            cfg.INPUT.MAX_SIZE_TRAIN,
            cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
        )
    ]
    if cfg.INPUT.RANDOM_FLIP != "none":
        augmentation.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
            )
        )
    if cfg.INPUT.CROP.ENABLED:
        augmentation.insert(0, T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    return augmentation
