"""The checked test loader (dcnv2.data.test_loader): an image that breaks when decoded, in a
data-loader worker, is one ImageReadError in the main process ("fail") or is left out and listed
("skip"); the header check finds empty, non-image and wrongly sized files."""

import numpy as np
import pytest
from PIL import Image

from dcnv2.data.test_loader import build_checked_test_loader, find_bad_images
from dcnv2.errors import ImageReadError


def _read(d):
    """A minimal mapper: the decoded image and the entry's id."""
    with Image.open(d["file_name"]) as image:
        return {"image_id": d["image_id"], "pixels": np.asarray(image.convert("RGB"))}


@pytest.fixture
def dicts(tmp_path):
    entries, rng = [], np.random.default_rng(0)
    for i in range(4):
        path = tmp_path / f"{i}.png"
        pixels = rng.integers(0, 256, size=(9, 11, 3), dtype=np.uint8)  # noise: ~300 bytes
        pixels[0, 0] = 40 * i
        Image.fromarray(pixels).save(path)
        entries.append({"file_name": str(path), "image_id": i, "height": 9, "width": 11})
    data = (tmp_path / "2.png").read_bytes()
    (tmp_path / "2.png").write_bytes(data[: len(data) // 2])  # header intact, pixels cut short
    return entries


@pytest.mark.parametrize("num_workers", [0, 1])
def test_image_cut_short_fails_in_the_main_process_or_is_skipped(dicts, num_workers):
    assert find_bad_images(dicts) == []  # the header check cannot see it
    loader = build_checked_test_loader(
        dicts, _read, dataset_name="d", mode="fail", num_workers=num_workers
    )
    with pytest.raises(ImageReadError) as excinfo:
        list(loader)
    message = str(excinfo.value)
    assert message.startswith(f"Cannot read image {dicts[2]['file_name']} of dataset 'd' in ")
    assert "Traceback" not in message and "\n" not in message

    loader = build_checked_test_loader(
        dicts, _read, dataset_name="d", mode="skip", num_workers=num_workers
    )
    batches = list(loader)
    assert [b[0]["image_id"] for b in batches] == [0, 1, 3]
    assert [int(b[0]["pixels"][0, 0, 0]) for b in batches] == [0, 40, 120]
    assert loader.skipped == [dicts[2]["file_name"]]
    assert len(loader) == 4


def test_header_check_finds_each_bad_file(dicts, tmp_path):
    open(dicts[0]["file_name"], "wb").close()
    (tmp_path / "1.png").write_text("text")
    dicts[3]["width"] = 12
    found = {d["image_id"]: problem for d, problem in find_bad_images(dicts)}
    assert sorted(found) == [0, 1, 3]
    assert "is empty (0 bytes)" in found[0]
    assert "is not an image file PIL can read (4 bytes of another format)" in found[1]
    assert "is 11x9 (width x height) but its annotation gives width=12, height=9" in found[3]
