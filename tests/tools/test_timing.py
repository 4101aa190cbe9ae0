"""What the benchmarks share: the table writer, the synthetic batch, the timing of repeated
runs, the peak-memory measure and the worker processes."""

import sys

import pytest
import torch

from dcnv2.tools import timing
from dcnv2.tools.cli import UserInputError


def test_markdown_table_is_unpadded():
    table = timing.text_table(["a", "bb"], [["x", 1], ["yyy", 2.5]])
    assert table.splitlines() == ["| a | bb |", "|---|---|", "| x | 1 |", "| yyy | 2.5 |"]


def test_console_table_aligns_columns():
    table = timing.text_table(["name", "s"], [["off", "1.500"], ["on", "12.250"]], markdown=False)
    assert table.splitlines() == ["name      s", "off   1.500", "on   12.250"]


def test_detection_batch_is_seeded_and_its_boxes_fit():
    a = timing.detection_batch(2, 61, 97, boxes_per_image=5, num_classes=3, seed=1)
    b = timing.detection_batch(2, 61, 97, boxes_per_image=5, num_classes=3, seed=1)
    c = timing.detection_batch(2, 61, 97, boxes_per_image=5, num_classes=3, seed=2)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert not torch.equal(a[0]["image"], c[0]["image"])
    for item in a:
        assert item["image"].shape == (3, 61, 97) and item["image"].dtype == torch.float32
        assert (item["height"], item["width"]) == (61, 97)
        assert 0 <= item["image"].min() and item["image"].max() <= 255
        boxes = item["instances"].gt_boxes.tensor
        assert boxes.shape == (5, 4)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 97).all() and (boxes[:, 3] <= 61).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 16).all()
        assert set(item["instances"].gt_classes.tolist()) <= {0, 1, 2}
    (plain,) = timing.detection_batch(1, 32, 32)
    assert "instances" not in plain


def test_time_runs_times_only_the_repeats(monkeypatch):
    clock = [0.0]
    calls = []

    def step():  # the n-th call takes n seconds on the fake clock
        calls.append(None)
        clock[0] += len(calls)

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    assert timing.time_runs(step, warmup=2, repeats=3) == [3.0, 4.0, 5.0]
    assert len(calls) == 5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_rss_counts_the_block_only():
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched: resident
    del big  # a large block goes back to the system: the high-water mark stays above
    with timing.PeakRSS() as idle:
        pass
    with timing.PeakRSS() as busy:
        x = torch.ones(48 * 2**20 // 4)
        del x
    assert idle.run_only and busy.run_only
    assert idle.growth_mib < 16  # not the 64 MiB peak before the block
    assert busy.growth_mib >= 44
    assert busy.peak_mib >= busy.start_mib > 0


def test_a_failing_worker_is_one_clear_error():
    spec = dict(config="faster_rcnn_R50_FPN_1x.yaml", opts=[], mode="nope", seed=0)
    with pytest.raises(
        UserInputError, match="benchmark of case X failed: ValueError: unknown mode"
    ):
        timing.run_in_fresh_process("dcnv2.tools.benchmark", spec, "case X")
