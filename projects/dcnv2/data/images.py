"""Reading images without silent damage, and image files checked against their dataset entry.

:func:`read_image` is detectron2's with 16-bit images scaled to 8 bits and float images refused;
:func:`image_file_problem` checks a file from its header only.
"""

import os
from typing import Optional, Tuple

import numpy as np
from detectron2.data.detection_utils import (
    _EXIF_ORIENT,
    _apply_exif_orientation,
    convert_PIL_to_numpy,
)
from detectron2.utils.file_io import PathManager
from PIL import Image, UnidentifiedImageError

from ..errors import ImageReadError

__all__ = ["exif_orientation", "image_file_problem", "read_image", "size_problem", "to_8bit"]

# Orientations that turn the image by 90 degrees (width and height swap when it is read).
_TURNED = {5: "transposed", 6: "rotated 90 degrees clockwise", 7: "transversed",
           8: "rotated 90 degrees counter-clockwise"}  # fmt: skip
_MODES_16 = ("I;16", "I;16L", "I;16B", "I;16N")  # PIL's modes of 16-bit single-channel pixels
_BITS_PER_SAMPLE = 258  # TIFF's tag


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened image; 1 (as stored) when it has none."""
    try:
        value = image.getexif().get(_EXIF_ORIENT, 1)
    except Exception:  # a malformed EXIF block: detectron2 then reads the image as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def size_problem(
    file_name: str, stored_wh: Tuple[int, int], orientation: int, expected_wh: Tuple[int, int]
) -> Optional[str]:
    """Why an image stored as ``stored_wh`` is not ``expected_wh`` once upright, or None."""
    turned = orientation in _TURNED
    (w, h), (rw, rh) = expected_wh, (stored_wh[::-1] if turned else stored_wh)
    if (rw, rh) == (w, h):
        return None
    if turned and tuple(stored_wh) == (w, h):
        return (
            f"image {file_name} is stored as {w}x{h} (width x height) but its EXIF orientation "
            f"{orientation} ({_TURNED[orientation]}) makes it {rw}x{rh} when read upright; its "
            f"annotation gives the stored size {w}x{h} (drawn on the unturned pixels?). Expected "
            f"{rw}x{rh}: remove the file's EXIF orientation tag (keeping the pixels) or turn the "
            "annotations too"
        )
    note = f" after its EXIF orientation {orientation}" if orientation != 1 else ""
    return (
        f"image {file_name} is {rw}x{rh} (width x height{note}) but its annotation gives "
        f"width={w}, height={h}; expected them equal"
    )


def image_file_problem(
    file_name: str, width: Optional[int] = None, height: Optional[int] = None
) -> Optional[str]:
    """Why an image file cannot be read as its entry says, from its header only, or None."""
    try:
        size = os.path.getsize(file_name)
    except OSError as e:
        return f"image {file_name} cannot be opened ({e.strerror or e})"
    if size == 0:
        return f"image {file_name} is empty (0 bytes); expected an image file"
    try:
        with Image.open(file_name) as image:
            stored_wh, orientation = image.size, exif_orientation(image)
    except UnidentifiedImageError:
        return (
            f"{file_name} is not an image file PIL can read ({size} bytes of another format); "
            "expected a JPEG, PNG or other image file"
        )
    except (OSError, SyntaxError, ValueError) as e:
        return f"image {file_name} cannot be read ({type(e).__name__}: {e})"
    if width is None or height is None:
        return None
    return size_problem(file_name, stored_wh, orientation, (width, height))


def _bit_depth(image: Image.Image, values: np.ndarray) -> Optional[int]:
    """Bits per pixel of a mode "I" image: TIFF's BitsPerSample, else 16 if the values fit."""
    bits = (getattr(image, "tag_v2", None) or {}).get(_BITS_PER_SAMPLE)
    bits = bits[0] if isinstance(bits, (tuple, list)) and bits else bits
    if isinstance(bits, int) and 1 <= bits <= 32:
        return bits
    return 16 if values.size and values.min() >= 0 and values.max() < 2**16 else None


def to_8bit(image: Image.Image, file_name: str = "") -> Image.Image:
    """``image``, or one PIL's ``convert`` turns into the right 8-bit pixels."""
    mode = image.mode
    if mode in _MODES_16 or mode == "I":
        values = np.asarray(image).astype(np.int64)
        bits = 16 if mode in _MODES_16 else _bit_depth(image, values)
        if bits is None:
            raise ImageReadError(
                f"image {file_name} has 32-bit integer pixels (PIL mode I) from "
                f"{values.min()} to {values.max()}; expected 8- or 16-bit pixels (0-65535)"
            )
        values = np.clip(values >> max(bits - 8, 0), 0, 255)
        return Image.fromarray(values.astype(np.uint8), mode="L")
    if mode == "F":
        raise ImageReadError(
            f"image {file_name} has floating-point pixels (PIL mode F), whose range is unknown; "
            "expected 8- or 16-bit integer pixels. Save it as an 8- or 16-bit image"
        )
    if mode in ("P", "PA") and ("transparency" in image.info or mode == "PA"):
        return image.convert("RGBA")
    return image


def read_image(
    file_name: str, format: Optional[str] = None, *, expected_size: Optional[Tuple[int, int]] = None
) -> np.ndarray:
    """An image file as detectron2's ``read_image`` reads it, without its silent damage.

    Raises:
        ImageReadError: its size differs from ``expected_size`` (width, height), or pixels that
            cannot be made 8-bit.
    """
    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)
        orientation = exif_orientation(image)
        if expected_size is not None:
            problem = size_problem(file_name, image.size, orientation, expected_size)
            if problem is not None:
                raise ImageReadError(problem)
        image = _apply_exif_orientation(image)  # as detectron2 reads it
        return convert_PIL_to_numpy(to_8bit(image, file_name), format)
