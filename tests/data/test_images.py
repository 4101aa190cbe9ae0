"""Images read for training and evaluation (dcnv2.data.images, dcnv2.data.mapper): tiny
synthetic files of every PIL mode a dataset may hold, their pixels compared with the expected
8-bit values computed here with numpy, and EXIF-turned images whose annotation gives the stored
size."""

import struct
import zlib

import numpy as np
import pytest
from detectron2.config import get_cfg
from PIL import Image

from dcnv2.data.images import image_file_problem, read_image, to_8bit
from dcnv2.data.mapper import DatasetMapper
from dcnv2.errors import ImageReadError

RNG = np.random.default_rng(0)
H, W = 5, 7  # odd, unequal: a transposed image cannot pass for the original


def _gray_bgr(values: np.ndarray) -> np.ndarray:
    return np.repeat(values.astype(np.uint8)[:, :, None], 3, axis=2)


def _mapped(path, is_train=False):
    """The image tensor dcnv2's DatasetMapper gives for ``path`` (no resize), as (H, W, C)."""
    cfg = get_cfg()
    mapper = DatasetMapper(cfg, is_train, augmentations=[])
    out = mapper({"file_name": str(path), "height": H, "width": W, "image_id": 1})
    return out["image"].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16_bit_images_are_scaled_not_clipped(tmp_path, suffix):
    values = RNG.integers(0, 2**16, size=(H, W), dtype=np.uint16)
    values[0, :3] = [0, 255, 65535]
    path = tmp_path / f"deep.{suffix}"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    expected = _gray_bgr(values // 256)
    np.testing.assert_array_equal(read_image(str(path), "BGR"), expected)
    np.testing.assert_array_equal(_mapped(path), expected)
    np.testing.assert_array_equal(read_image(str(path), "L")[:, :, 0], values // 256)


def _png_rgb48(path, values: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG written byte by byte (PIL cannot write one)."""
    height, width, _ = values.shape
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                + chunk(b"IEND", b""))  # fmt: skip


def test_16_bit_rgb_png_keeps_the_high_byte(tmp_path):
    values = RNG.integers(0, 2**16, size=(H, W, 3), dtype=np.uint16)
    path = tmp_path / "rgb48.png"
    _png_rgb48(path, values)
    np.testing.assert_array_equal(read_image(str(path), "RGB"), (values >> 8).astype(np.uint8))


def test_integer_images_are_scaled_by_their_bit_depth(tmp_path):
    # A 32-bit TIFF (BitsPerSample 32): value >> 24.
    values = RNG.integers(0, 2**31, size=(H, W), dtype=np.int64).astype(np.int32)
    path = tmp_path / "deep32.tif"
    Image.fromarray(values, mode="I").save(path)
    np.testing.assert_array_equal(read_image(str(path), "BGR"), _gray_bgr(values >> 24))
    # Mode "I" without a bit depth (as older PIL opens 16-bit PNGs): 16 bits.
    values = RNG.integers(0, 2**16, size=(H, W)).astype(np.int32)
    image = to_8bit(Image.fromarray(values, mode="I"))
    np.testing.assert_array_equal(np.asarray(image), values >> 8)
    values[0, 0] = -5
    with pytest.raises(ImageReadError, match="x.png has 32-bit integer pixels .* from -5 to"):
        to_8bit(Image.fromarray(values, mode="I"), "x.png")


def test_floating_point_images_are_refused(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(RNG.random((H, W)).astype(np.float32), mode="F").save(path)
    with pytest.raises(ImageReadError, match=f"image {path} has floating-point pixels"):
        read_image(str(path), "BGR")


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_images(tmp_path, transparent):
    palette = RNG.integers(0, 256, size=(256, 3), dtype=np.uint8)
    index = RNG.integers(0, 256, size=(H, W), dtype=np.uint8)
    image = Image.fromarray(index, mode="P")
    image.putpalette(palette.tobytes())
    path = tmp_path / "palette.png"
    image.save(path, **({"transparency": 3} if transparent else {}))
    np.testing.assert_array_equal(read_image(str(path), "RGB"), palette[index])
    np.testing.assert_array_equal(_mapped(path), palette[index][:, :, ::-1])


def test_gray_alpha_bilevel_and_cmyk_images(tmp_path):
    gray = RNG.integers(0, 256, size=(H, W), dtype=np.uint8)
    alpha = RNG.integers(0, 256, size=(H, W), dtype=np.uint8)
    Image.fromarray(np.stack([gray, alpha], axis=2), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(str(tmp_path / "la.png"), "BGR"), _gray_bgr(gray))

    bits = RNG.integers(0, 2, size=(H, W)).astype(bool)
    Image.fromarray(bits).save(tmp_path / "bits.png")
    assert Image.open(tmp_path / "bits.png").mode == "1"
    np.testing.assert_array_equal(
        read_image(str(tmp_path / "bits.png"), "BGR"), _gray_bgr(bits * 255)
    )

    # Pure inks: cyan, magenta, yellow, black, none -> RGB.
    inks = np.array([[255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 255, 0], [0, 0, 0, 255], [0, 0, 0, 0]],
                    dtype=np.uint8)  # fmt: skip
    rgb = np.array([[0, 255, 255], [255, 0, 255], [255, 255, 0], [0, 0, 0], [255, 255, 255]])
    Image.fromarray(inks[None], mode="CMYK").save(tmp_path / "cmyk.tif")
    np.testing.assert_array_equal(read_image(str(tmp_path / "cmyk.tif"), "RGB")[0], rgb)


def _turned_png(path, orientation):
    values = RNG.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(values).save(path, exif=exif)
    return values


def test_exif_turned_image_is_read_upright(tmp_path):
    values = _turned_png(tmp_path / "turned.png", 6)  # rotate 90 degrees clockwise to view
    image = read_image(str(tmp_path / "turned.png"), "RGB", expected_size=(H, W))
    np.testing.assert_array_equal(image, np.rot90(values, k=-1))


def test_annotation_with_the_stored_size_of_a_turned_image_says_so(tmp_path):
    path = tmp_path / "turned.png"
    _turned_png(path, 8)
    expected = (
        f"image {path} is stored as {W}x{H} (width x height) but its EXIF orientation 8 "
        f"(rotated 90 degrees counter-clockwise) makes it {H}x{W} when read upright; its "
        f"annotation gives the stored size {W}x{H}"
    )
    assert image_file_problem(str(path), W, H).startswith(expected)
    with pytest.raises(ImageReadError) as excinfo:
        _mapped(path, is_train=True)  # the mapper's entry gives the stored size
    assert str(excinfo.value).startswith(expected)
    assert "remove the file's EXIF orientation tag" in str(excinfo.value)
    # Another size altogether: the plain mismatch, naming the orientation.
    assert image_file_problem(str(path), 9, 9) == (
        f"image {path} is {H}x{W} (width x height after its EXIF orientation 8) but its "
        "annotation gives width=9, height=9; expected them equal"
    )
    assert image_file_problem(str(path), H, W) is None
