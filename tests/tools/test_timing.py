"""The one timing harness: the table writer, the synthetic batch, the training step, the timing
and its summary, the peak-memory measure and the worker processes."""

import json
import subprocess
import sys

import pytest
import torch

from dcnv2.errors import UserInputError
from dcnv2.tools import timing


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_markdown_table_has_the_cells_and_a_dash_for_none():
    lines = timing.text_table(["a", "bb"], [["x", 1], ["yyy", None]]).splitlines()
    assert [_cells(line) for line in lines[:1] + lines[2:]] == [
        ["a", "bb"],
        ["x", "1"],
        ["yyy", "-"],
    ]
    assert set(lines[1]) <= set("|-: ")


def test_console_table_aligns_the_first_column_left_and_the_others_right():
    table = timing.text_table(["name", "s"], [["off", "1.500"], ["on", "12.250"]], markdown=False)
    lines = [line for line in table.splitlines() if set(line) - set("- ")]
    assert [line.split() for line in lines] == [["name", "s"], ["off", "1.500"], ["on", "12.250"]]
    assert lines[1].startswith("off") and len({len(line) for line in lines}) == 1


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


def test_time_call_times_one_call_and_summarize_gives_median_and_spread(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(timing, "timer", lambda: clock[0])

    def step():
        clock[0] += 2.5

    assert timing.time_call(step) == 2.5
    stats = timing.summarize([1.0, 2.0, 3.0, 10.0])
    assert stats == dict(median_s=2.5, iqr_s=3.0, min_s=1.0, max_s=10.0, runs=4)


class _Toy(torch.nn.Module):
    """A "detector" whose loss is its weight times the sum of the batch's images."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, batch):
        return {"loss": self.weight * sum(x["image"].sum() for x in batch) / 1000}


@pytest.mark.parametrize("amp", [False, True])
def test_training_step_runs_the_projects_training_loop(amp):
    from dcnv2.engine.trainer import build_training_loop

    model, batch = _Toy(), timing.detection_batch(1, 8, 8)
    step = timing.training_step(model, batch, amp=amp, lr=0.1, momentum=0.0)
    assert isinstance(step.loop, type(build_training_loop(_Toy(), [], None, amp=amp)))
    for _ in range(2):
        step()
    image_sum = batch[0]["image"].sum().item() / 1000
    assert step.loop.iter == step.loop.storage.iter == 2
    assert model.weight.item() == pytest.approx(1 - 2 * 0.1 * image_sum, rel=1e-2)
    losses = [v for v, _ in step.loop.storage.history("total_loss").values()]
    assert losses[0] == pytest.approx(image_sum, rel=1e-2) and len(losses) == 2


def test_sync_count_is_not_applicable_off_cuda():
    assert timing.count_syncs(lambda: None, cuda=False) == {
        "syncs": "n/a",
        "syncs_in_layers": "n/a",
    }


def test_syncs_are_counted_and_attributed_to_the_layers_by_the_warnings_frame(monkeypatch):
    import warnings

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    message = "called a synchronizing CUDA operation"

    def step():  # what torch's sync debug mode reports, from three places
        for path in ("/x/dcnv2/layers/deform_conv.py", "/y/detectron2/layers/deform_conv.py"):
            warnings.warn_explicit(message, UserWarning, path, 1)
        warnings.warn_explicit(message, UserWarning, "/x/detectron2/engine/train_loop.py", 1)
        warnings.warn_explicit("something else", UserWarning, "/x/dcnv2/layers/a.py", 1)

    assert timing.count_syncs(step) == {"syncs": 3, "syncs_in_layers": 2}
    assert modes == ["warn", 0]


# In a fresh interpreter: what earlier tests left in this process's allocator (freed blocks it
# keeps, raised mmap thresholds) would let the block reuse resident pages.
_PEAK_SCRIPT = """
import json, torch
from dcnv2.tools import timing
big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched: resident
del big  # a large block goes back to the system: the high-water mark stays above
with timing.PeakMemory() as idle:
    pass
with timing.PeakMemory() as busy:
    x = torch.ones(48 * 2**20 // 4)
    del x
print(json.dumps([idle.run_only, busy.run_only, idle.growth_mib, busy.growth_mib,
                  busy.peak_mib, busy.start_mib]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_rss_counts_the_block_only():
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, check=True
    ).stdout
    idle_reset, busy_reset, idle_growth, busy_growth, peak, start = json.loads(out.splitlines()[-1])
    assert idle_reset and busy_reset
    assert idle_growth < 16  # not the 64 MiB peak before the block
    assert busy_growth >= 44
    assert peak >= start > 0


def test_a_failing_worker_is_one_clear_error():
    spec = dict(config="faster_rcnn_R50_FPN_1x.yaml", opts=[], mode="nope", seed=0)
    with pytest.raises(
        UserInputError, match="benchmark of case X failed: ValueError: unknown mode"
    ):
        timing.run_in_fresh_process("dcnv2.tools.benchmark", spec, "case X")
