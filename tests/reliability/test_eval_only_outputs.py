"""``train_net.py --eval-only`` in a folder that holds a run: the training run's config.yaml stays,
and results of other weights in OUTPUT_DIR/inference are replaced only with --force
(dcnv2.engine.eval_output)."""

import json
import os

import pytest
import torch

from dcnv2.engine.eval_output import EVAL_CONFIG, WEIGHTS_RECORD, check_eval_results
from dcnv2.errors import OutputDirError

RESULTS = os.path.join("inference", "coco_instances_results.json")


def _weights(rel, folder, seed):
    """Random-init weights of the tiny model (different for each seed) in ``folder``."""
    from detectron2.modeling import build_model

    from dcnv2.config import get_cfg

    cfg = get_cfg(rel.QUICK, rel.tiny_args("")[2:])
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model_final.pth"
    torch.save({"model": build_model(cfg).state_dict()}, path)
    return str(path)


def _eval(rel, train_net, out, weights, *flags):
    opts = ["DATASETS.TEST", f"('{rel.DATASET}',)", "MODEL.WEIGHTS", weights]
    opts += ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "5"]
    train_net.invoke_main(rel.tiny_args(out, *opts, flags=["--eval-only", *flags]))


def test_eval_only_never_replaces_other_weights_results_silently(
    rel, train_net, tiny_dataset, tmp_path, capsys
):
    out = tmp_path / "run"
    out.mkdir()
    training_config = "# the training run's config\n"
    (out / "config.yaml").write_text(training_config)
    first = _weights(rel, tmp_path / "a", seed=0)
    other = _weights(rel, tmp_path / "b", seed=1)

    _eval(rel, train_net, out, first)
    assert (out / "config.yaml").read_text() == training_config
    assert (out / EVAL_CONFIG).is_file()
    assert json.loads((out / "inference" / WEIGHTS_RECORD).read_text())["path"] == first
    results = (out / RESULTS).read_bytes()
    assert json.loads(results), "no detections to compare"

    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        _eval(rel, train_net, out, other)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("train_net.py: error: --eval-only would")
    assert f"results of other weights ({first})" in err and "--force" in err
    assert "OUTPUT_DIR" in err
    assert (out / RESULTS).read_bytes() == results

    from dcnv2.config import get_cfg

    check_eval_results(get_cfg(rel.QUICK, ["OUTPUT_DIR", str(out)]), first, force=False)  # same
    _eval(rel, train_net, out, other, "--force")
    assert (out / RESULTS).read_bytes() != results
    assert json.loads((out / "inference" / WEIGHTS_RECORD).read_text())["path"] == other
    assert (out / "config.yaml").read_text() == training_config


def test_a_training_runs_own_results_take_its_final_weights_only(rel, tmp_path):
    """Results without a record were written by the run in that folder: its model_final.pth
    may re-evaluate them, other weights may not."""
    from dcnv2.config import get_cfg

    out = tmp_path / "run"
    (out / "inference").mkdir(parents=True)
    (out / RESULTS).write_text("[]")
    own = _weights(rel, out, seed=0)
    elsewhere = _weights(rel, tmp_path / "other", seed=0)
    cfg = get_cfg(rel.QUICK, ["OUTPUT_DIR", str(out)])
    check_eval_results(cfg, own, force=False)
    with pytest.raises(OutputDirError, match="results of the run in that folder"):
        check_eval_results(cfg, elsewhere, force=False)
    check_eval_results(cfg, elsewhere, force=True)
    # No results yet: nothing to protect.
    check_eval_results(
        get_cfg(rel.QUICK, ["OUTPUT_DIR", str(tmp_path / "new")]), elsewhere, force=False
    )
