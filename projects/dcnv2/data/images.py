"""Image files checked against their dataset entry.

:func:`image_file_problem` reads only a file's header (its format, stored size and EXIF
orientation), so a whole test set is checked in about a millisecond per image before a run
starts: an empty file, a file that is no image, or an image whose size differs from its
annotation's ``width``/``height`` is named with what was expected. An image whose EXIF
orientation turns it (detectron2 reads images turned upright) and whose annotation gives the size
of the stored, unturned pixels gets a message that says so, instead of a bare size mismatch.
"""

import os
from typing import Optional, Tuple

from PIL import Image, UnidentifiedImageError

__all__ = ["EXIF_ORIENTATION", "exif_orientation", "image_file_problem", "size_problem"]

# The EXIF tag detectron2's read_image applies (detection_utils._EXIF_ORIENT).
EXIF_ORIENTATION = 0x0112
# Orientations that turn the image by 90 degrees (width and height swap when it is read).
_TURNED = {5: "transposed", 6: "rotated 90 degrees clockwise", 7: "transversed",
           8: "rotated 90 degrees counter-clockwise"}  # fmt: skip


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened image; 1 (as stored) when it has none."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block: detectron2 then reads the image as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def size_problem(
    file_name: str, stored_wh: Tuple[int, int], orientation: int, expected_wh: Tuple[int, int]
) -> Optional[str]:
    """Why an image does not have the size its annotation gives, or None when it does.

    Args:
        file_name: the image file, for the message.
        stored_wh: (width, height) of the pixels as stored in the file.
        orientation: its EXIF orientation (:func:`exif_orientation`).
        expected_wh: (width, height) of its dataset entry.
    """
    turned = orientation in _TURNED
    read_wh = stored_wh[::-1] if turned else tuple(stored_wh)
    if tuple(read_wh) == tuple(expected_wh):
        return None
    w, h = expected_wh
    if turned and tuple(stored_wh) == tuple(expected_wh):
        return (
            f"image {file_name} is stored as {stored_wh[0]}x{stored_wh[1]} (width x height) but "
            f"its EXIF orientation {orientation} ({_TURNED[orientation]}) makes it "
            f"{read_wh[0]}x{read_wh[1]} when read upright; its annotation gives the stored size "
            f"{w}x{h}, so the annotations were likely drawn on the unturned pixels. Expected the "
            f"annotation to give {read_wh[0]}x{read_wh[1]}: remove the file's EXIF orientation "
            "tag (keeping the pixels as stored) or turn the annotations with the image"
        )
    note = f" after its EXIF orientation {orientation}" if orientation != 1 else ""
    return (
        f"image {file_name} is {read_wh[0]}x{read_wh[1]} (width x height{note}) but its "
        f"annotation gives width={w}, height={h}; expected them equal"
    )


def image_file_problem(
    file_name: str, width: Optional[int] = None, height: Optional[int] = None
) -> Optional[str]:
    """Why an image file cannot be read as its dataset entry says, from its header only.

    Args:
        file_name: the image file.
        width, height: the entry's size; None to check only that the file is an image.

    Returns:
        One line naming the file and what was expected, or None when the header is fine.
        Pixel data are not decoded: a file cut short after its header passes here and is
        reported when it is read.
    """
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
