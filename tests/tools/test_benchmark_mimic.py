"""dcnv2.tools.benchmark_mimic and tools/benchmark_mimic.py on tiny images (no speed asserted)."""

import importlib.util
import json
import os

import pytest

from dcnv2.errors import UserInputError
from dcnv2.tools.benchmark_mimic import benchmark_mimic, format_table

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A small crop keeps the mimicking branch cheap; the ResNet-50 is what it is.
SMALL = ["MODEL.DCNV2.MIMIC.CROP_SIZE", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32"]


def test_tool_times_both_variants_and_counts_crops(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "dcnv2_tool_benchmark_mimic", os.path.join(ROOT, "tools", "benchmark_mimic.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "m.json"
    argv = ["--height", "64", "--width", "96", "--batch", "1", "--boxes", "2", "--iters", "1"]
    assert tool.main(argv + ["--json", str(out), "--opts", *SMALL]) == 0
    result = json.loads(out.read_text())
    off, on = result["results"]["off"], result["results"]["on"]
    assert off["crops_per_iter"] == 0 < on["crops_per_iter"]  # the plain detector crops nothing
    assert off["seconds_per_iter"] > 0 and on["seconds_per_iter"] > 0
    overhead = on["seconds_per_iter"] / off["seconds_per_iter"] - 1
    assert result["overhead"] == pytest.approx(overhead)
    extra = on["seconds_per_iter"] - off["seconds_per_iter"]
    assert result["seconds_per_crop"] == pytest.approx(extra / on["crops_per_iter"])
    assert result["crop_size"] == 64 and result["gt_boxes_per_image"] == 2
    printed = capsys.readouterr().out
    assert printed.strip().endswith(format_table(result))
    assert f"{result['seconds_per_crop']:+.3f} s per crop" in format_table(result)
    assert printed.splitlines()[0].split() == ["mimic", "s/iter", "crops/iter"]


def test_bad_arguments_are_clear_errors():
    with pytest.raises(UserInputError, match="--iters >= 1"):
        benchmark_mimic("faster_rcnn_R50_mdconv_mdpool_mimic_FPN_1x.yaml", iters=0)
    with pytest.raises(UserInputError, match="does not enable MODEL.DCNV2.MIMIC"):
        benchmark_mimic("faster_rcnn_R50_mdconv_FPN_1x.yaml")
