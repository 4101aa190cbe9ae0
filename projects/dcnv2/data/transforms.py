"""Image resizing as detectron2 (PIL) or MMDetection (OpenCV) does it, and augmentation builders."""

from typing import List, Tuple

import numpy as np
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.data.transforms import Transform
from PIL import Image

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


class OpenCVResizeTransform(T.ResizeTransform):
    """detectron2's ``ResizeTransform`` with ``cv2.resize``, as MMDetection's ``Resize``."""

    def apply_image(self, img: np.ndarray, interp=None) -> np.ndarray:
        """(H, W[, C]) image -> (new_h, new_w[, C]); ``interp`` Image.NEAREST or bilinear."""
        if img.dtype == bool:  # a mask: OpenCV does not resize boolean arrays
            return self.apply_image(img.view(np.uint8), interp).view(bool)
        if img.shape[:2] != (self.h, self.w):
            raise ValueError(
                f"OpenCVResizeTransform for {self.h}x{self.w} images got an image of shape "
                f"{img.shape}"
            )
        cv2 = _cv2()
        mode = cv2.INTER_NEAREST if interp == Image.NEAREST else cv2.INTER_LINEAR
        out = cv2.resize(np.ascontiguousarray(img), (self.new_w, self.new_h), interpolation=mode)
        return out[:, :, None] if img.ndim == 3 and out.ndim == 2 else out  # a lost channel

    def inverse(self) -> "OpenCVResizeTransform":
        return OpenCVResizeTransform(self.new_h, self.new_w, self.h, self.w)


class OpenCVResizeShortestEdge(T.ResizeShortestEdge):
    """MMDetection's keep-ratio resize, ``short`` drawn as detectron2's ``ResizeShortestEdge``."""

    def get_transform(self, image: np.ndarray) -> Transform:
        h, w = image.shape[:2]
        if self.is_range:
            short = np.random.randint(self.short_edge_length[0], self.short_edge_length[1] + 1)
        else:
            short = np.random.choice(self.short_edge_length)
        if short == 0:
            return T.NoOpTransform()
        new_h, new_w = mmdet_rescale_size(h, w, float(short), float(self.max_size))
        return OpenCVResizeTransform(h, w, new_h, new_w)


def _with_backend(cfg, augmentation: List[T.Augmentation]) -> List[T.Augmentation]:
    """detectron2's ``build_augmentation``, its resize done by ``INPUT.DCNV2.RESIZE_BACKEND``."""
    backend = cfg.INPUT.get("DCNV2", {}).get("RESIZE_BACKEND", "pil")
    if backend not in RESIZE_BACKENDS:
        raise ResizeBackendError(
            f"INPUT.DCNV2.RESIZE_BACKEND is {backend!r}; expected one of 'pil', 'opencv'"
        )
    if backend == "opencv":
        _cv2()  # installed?
        d2 = augmentation[0]
        augmentation[0] = OpenCVResizeShortestEdge(
            d2.short_edge_length, d2.max_size, d2.sample_style
        )
    return augmentation


def build_test_augmentation(cfg) -> List[T.Augmentation]:
    """The test resize with ``INPUT.DCNV2.RESIZE_BACKEND``'s method."""
    return _with_backend(cfg, utils.build_augmentation(cfg, False))


def build_train_augmentation(cfg) -> List[T.Augmentation]:
    """``DatasetMapper(cfg, True)``'s augmentation with ``INPUT.DCNV2.RESIZE_BACKEND``."""
    augmentation = _with_backend(cfg, utils.build_augmentation(cfg, True))
    if cfg.INPUT.CROP.ENABLED:
        augmentation.insert(0, T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    return augmentation
