"""train_net.py end to end, as a user runs it: training on the generated dataset, evaluation with
the COCO evaluator, the missing-dataset error, and two CPU processes through detectron2's launch.
"""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import hooks

from dcnv2.data.synthetic import SPLITS, prepare_synthetic_split, register_synthetic_dataset
from dcnv2.tools.cli import KNOWN_LOG_MESSAGES, KNOWN_WARNINGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "train_net.py")
QUICK = os.path.join(REPO, "configs", "quick", "faster_rcnn_R50_mdconv_FPN_instant.yaml")
BOX_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@pytest.fixture(scope="session")
def datasets_root(tmp_path_factory):
    """$DETECTRON2_DATASETS of the subprocesses, with the synthetic splits generated once."""
    root = str(tmp_path_factory.mktemp("datasets"))
    for split, (num_images, seed) in SPLITS.items():
        prepare_synthetic_split(root, split, num_images, seed)
    return root


def run_train_net(args, datasets_root):
    env = dict(os.environ, DETECTRON2_DATASETS=datasets_root)
    return subprocess.run(
        [sys.executable, TRAIN_NET, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def trained(datasets_root, tmp_path_factory, tiny_opts):
    """Output folder of 20 iterations (one metrics.json record) of the shrunk embedded default."""
    out_dir = str(tmp_path_factory.mktemp("train"))
    # No evaluation here: test_eval_only evaluates the weights.
    opts = ["SOLVER.MAX_ITER", "20", "DATASETS.TEST", "()", "OUTPUT_DIR", out_dir]
    _ok(run_train_net(["--config-file", QUICK, *tiny_opts, *opts], datasets_root))
    return out_dir


def test_training_writes_finite_losses_below_their_random_init_values(trained):
    (record,) = _metrics(trained)
    assert record["iteration"] == 19
    losses = {k: v for k, v in record.items() if k.startswith("loss_") or k == "total_loss"}
    assert {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    assert all(math.isfinite(v) for v in losses.values()), losses
    # Medians over the 20 iterations. At random init the box classifier (4 classes with
    # background) and the objectness logits are ~0: cross-entropies ln 4 and ln 2.
    assert losses["loss_cls"] < 0.8 * math.log(4)
    assert losses["loss_rpn_cls"] < 0.8 * math.log(2)
    assert os.path.isfile(os.path.join(trained, "model_final.pth"))


def _import_train_net():
    # By path: "tools" and the repository root are not packages to import from.
    spec = importlib.util.spec_from_file_location("dcnv2_train_net_under_test", TRAIN_NET)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_losses_decrease_iteration_by_iteration(datasets_root, tmp_path, monkeypatch, tiny_opts):
    train_net = _import_train_net()
    history = []

    class RecordingTrainer(train_net.Trainer):
        def build_hooks(self):
            record = hooks.CallbackHook(
                after_step=lambda t: history.append(t.storage.history("total_loss").latest())
            )
            return super().build_hooks() + [record]

    monkeypatch.setattr(train_net, "Trainer", RecordingTrainer)
    # The registered datasets were resolved at import; these point at the session's copy.
    opts = ["DATASETS.TRAIN", "('_test_train_net_synthetic',)", "DATASETS.TEST", "()"]
    opts += ["SOLVER.MAX_ITER", "8", "SOLVER.WARMUP_ITERS", "0", "SOLVER.BASE_LR", "0.01"]
    args = train_net.train_net_parser(train_net.__doc__).parse_args(
        ["--config-file", QUICK, *tiny_opts, *opts, "OUTPUT_DIR", str(tmp_path)]
    )
    name = "_test_train_net_synthetic"
    register_synthetic_dataset(name, datasets_root, "train", *SPLITS["train"])
    try:
        train_net.main(args)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert len(history) == 8 and all(math.isfinite(v) for v in history), history
    assert sum(history[-3:]) / 3 < 0.7 * history[0], history


def test_eval_only_reports_coco_box_metrics(trained, datasets_root, tmp_path, tiny_opts):
    weights = os.path.join(trained, "model_final.pth")
    # Score threshold 0: a briefly trained model still gives detections to evaluate.
    opts = ["MODEL.WEIGHTS", weights, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    opts += ["OUTPUT_DIR", str(tmp_path)]
    args = ["--config-file", QUICK, "--eval-only", *tiny_opts, *opts]
    out = _ok(run_train_net(args, datasets_root))
    # detectron2 prints each task's results as "copypaste:" csv lines.
    rows = re.findall(r"copypaste: (.*)", out)
    assert rows[:2] == ["Task: bbox", ",".join(BOX_METRICS)], rows
    values = [float(v) for v in rows[2].split(",")]
    assert all(math.isfinite(v) and 0 <= v <= 100 for v in values), values
    with open(os.path.join(tmp_path, "inference", "coco_instances_results.json")) as f:
        detections = json.load(f)
    assert detections and {d["category_id"] for d in detections} <= {1, 2, 3}


def test_missing_coco_is_one_clear_error_before_any_model(tmp_path):
    config = os.path.join(REPO, "configs", "faster_rcnn_R50_mdconv_FPN_1x.yaml")
    proc = run_train_net(["--config-file", config, "MODEL.DEVICE", "cpu"], str(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in out
    assert out.count("error:") == 1, out
    path = os.path.join(str(tmp_path), "coco", "annotations", "instances_val2017.json")
    assert f"not found at {path}" in out
    assert "$DETECTRON2_DATASETS/coco/annotations/instances_{train,val}2017.json" in out
    assert "GeneralizedRCNN" not in out and "Starting training" not in out


def test_two_cpu_processes_train_through_launch(datasets_root, tmp_path, tiny_opts):
    opts = ["SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "3", "DATASETS.TEST", "()"]
    opts += ["OUTPUT_DIR", str(tmp_path)]
    args = ["--config-file", QUICK, "--num-gpus", "2", "--dist-url", "auto"]
    out = _ok(run_train_net([*args, *tiny_opts, *opts], datasets_root))
    # Both ranks ran; DefaultTrainer wraps the model in DDP whenever the world size is > 1.
    assert "Rank of current process: 0. World size: 2" in out
    with open(os.path.join(tmp_path, "log.txt.rank1")) as f:
        assert "Rank of current process: 1. World size: 2" in f.read()
    assert [r["iteration"] for r in _metrics(str(tmp_path))] == [2]
    assert os.path.isfile(os.path.join(tmp_path, "model_final.pth"))
    # Neither process prints the known third-party messages (DDP's broadcast_buffers included).
    known = [m for _, m in KNOWN_WARNINGS] + list(KNOWN_LOG_MESSAGES.values())
    assert [m for m in known if m in out] == [], out[-3000:]
