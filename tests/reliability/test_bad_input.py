"""Bad input to train_net.py: each case is one "train_net.py: error: ..." message saying what is
wrong, which file or key, and what was expected, raised before anything is written (the output
folder's files keep their bytes); bad annotation entries and unreadable images can be skipped
instead."""

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

import dcnv2
from dcnv2.checkpoint import DCNv2Checkpointer
from dcnv2.engine.preflight import check_devices
from dcnv2.errors import LaunchError, WeightsError


@pytest.fixture
def make_dataset(rel, tmp_path):
    """Register a tiny COCO dataset, changed by ``edit(coco_dict, image_root)``; its name."""
    names = []

    def make(edit=None):
        root = tmp_path / f"dataset{len(names)}"
        json_file, image_root = rel.write_tiny_coco(str(root), num_images=4)
        if edit is not None:
            with open(json_file) as f:
                coco = json.load(f)
            coco = edit(coco, image_root) or coco
            with open(json_file, "w") as f:
                json.dump(coco, f)
        name = f"_bad_input_{len(names)}"
        register_coco_instances(name, {}, json_file, image_root)
        names.append(name)
        return name, json_file, image_root

    yield make
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.fixture
def output_dir(tmp_path):
    """An OUTPUT_DIR holding an earlier run's files."""
    out = tmp_path / "output"
    out.mkdir()
    for name, data in [("config.yaml", b"earlier"), ("last_checkpoint", b"model_0000001.pth")]:
        (out / name).write_bytes(data)
    torch.save({"model": {}}, out / "model_0000001.pth")
    return out


def _snapshot(folder):
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}


def _error(train_net, argv) -> str:
    # dcnv2.errors' exit convention: one "train_net.py: error: ..." on stderr, exit status 2.
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as excinfo, contextlib.redirect_stderr(stderr):
        train_net.invoke_main([str(a) for a in argv])
    message = stderr.getvalue()
    assert excinfo.value.code == 2, message
    assert message.startswith("train_net.py: error: ") and message.count("error:") == 1, message
    assert "Traceback" not in message
    return message


def _args(rel, output_dir, dataset=None, *opts, flags=()):
    data = ["DATASETS.TRAIN", f"('{dataset}',)"] if dataset else []
    return rel.tiny_args(output_dir, *data, *opts, flags=flags)


def _drop_image_2(coco, image_root):
    os.remove(os.path.join(image_root, "002.png"))


def _negative_box(coco, image_root):
    coco["annotations"][2]["bbox"] = [10, 10, -5, 4]


def _unknown_category(coco, image_root):
    coco["annotations"][4]["category_id"] = 99


@pytest.mark.parametrize(
    "edit, expected",
    [
        (_drop_image_2, "image id 2: file {root}/002.png not found"),
        (_negative_box, "annotation id 3 (image 2): bbox [10, 10, -5, 4] has a negative size"),
        (_unknown_category,
         "annotation id 5 (image 3): category_id 99 is not in 'categories' (ids 1, 2, 3)"),
    ],
)  # fmt: skip
def test_inconsistent_annotations_fail_listing_the_entry(
    rel, train_net, make_dataset, output_dir, edit, expected
):
    name, json_file, image_root = make_dataset(edit)
    before = _snapshot(output_dir)
    message = _error(train_net, _args(rel, output_dir, name))
    assert f"Dataset {name!r}: {json_file} has 1 problem:" in message
    assert expected.format(root=image_root) in message
    assert "set DATASETS.DCNV2.ON_BAD_DATA skip to drop these entries" in message
    assert _snapshot(output_dir) == before


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda coco, root: None, "annotation file not found at {json}"),
        (lambda coco, root: os.rename(root, root + "_moved"), "image folder not found at {root}"),
        (lambda coco, root: {"images": coco["images"]}, "has no 'annotations' / 'categories' list"),
        (None, "is not valid JSON (line 1, column"),
    ],
    ids=["missing-annotation-file", "missing-image-folder", "no-annotations", "truncated-json"],
)
def test_missing_or_malformed_dataset_files(
    rel, train_net, make_dataset, output_dir, edit, expected
):
    name, json_file, image_root = make_dataset(edit)
    if expected.startswith("annotation file"):
        os.remove(json_file)
    if edit is None:  # cut short, as by an interrupted copy
        with open(json_file, "rb") as f:
            data = f.read()
        with open(json_file, "wb") as f:
            f.write(data[: len(data) // 2])
    before = _snapshot(output_dir)
    message = _error(train_net, _args(rel, output_dir, name))
    assert expected.format(json=json_file, root=image_root) in message
    assert _snapshot(output_dir) == before


def test_skip_mode_trains_without_the_bad_entries(rel, train_net, make_dataset, tmp_path):
    def edit(coco, image_root):
        for fault in (_drop_image_2, _negative_box, _unknown_category):
            fault(coco, image_root)

    name, json_file, _ = make_dataset(edit)
    opts = ["DATASETS.DCNV2.ON_BAD_DATA", "skip", "SOLVER.MAX_ITER", "2"]
    train_net.invoke_main(_args(rel, tmp_path, name, *opts))
    log = (tmp_path / "log.txt").read_text()
    assert f"Dataset {name!r}: {json_file} has 3 problems:" in log
    assert "ON_BAD_DATA is 'skip': training without these entries" in log
    # Image 2 is gone with its 2 annotations; image 3 lost its unknown-category box.
    assert "Loaded 3 images in COCO format" in log
    assert torch.load(tmp_path / "model_final.pth", weights_only=True)["iteration"] == 1


def test_skip_mode_filters_the_loaded_dicts_and_leaves_the_catalog_alone(make_dataset, monkeypatch):
    from dcnv2.data.validation import load_training_dicts

    def edit(coco, image_root):
        for fault in (_drop_image_2, _negative_box, _unknown_category):
            fault(coco, image_root)

    name, _, _ = make_dataset(edit)
    registered = DatasetCatalog[name]

    def refuse(*args, **kwargs):
        raise AssertionError("the dataset catalog was changed")

    monkeypatch.setattr(DatasetCatalog, "register", refuse)
    monkeypatch.setattr(DatasetCatalog, "remove", refuse)
    dicts = load_training_dicts([name], "skip", filter_empty=False)
    monkeypatch.undo()
    assert DatasetCatalog[name] is registered
    # Image 2 is gone with its 2 annotations; image 3 lost its unknown-category box.
    annotations = {d["image_id"]: len(d["annotations"]) for d in dicts}
    assert annotations == {1: 2, 3: 1, 4: 2}


def _truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _garbage(path):
    with open(path, "wb") as f:
        f.write(os.urandom(300))


@pytest.mark.parametrize("damage", [_truncate, _garbage], ids=["truncated", "not-an-image"])
def test_unreadable_image_fails_naming_it_or_is_skipped(
    rel, train_net, make_dataset, tmp_path, damage
):
    name, _, image_root = make_dataset()
    bad = os.path.join(image_root, "003.png")
    damage(bad)
    # 4 images, 2 iterations of 2: every image is read. A worker process reads them (fail mode).
    opts = ["SOLVER.MAX_ITER", "2", "DATALOADER.NUM_WORKERS", "1"]
    message = _error(train_net, _args(rel, tmp_path / "fail", name, *opts))
    assert f"Cannot read training image {bad}:" in message
    assert "set DATASETS.DCNV2.ON_BAD_DATA skip to train without it" in message

    skip = ["SOLVER.MAX_ITER", "2", "DATASETS.DCNV2.ON_BAD_DATA", "skip"]
    train_net.invoke_main(_args(rel, tmp_path / "skip", name, *skip))
    assert f"Skipping image {bad}, which cannot be read" in (tmp_path / "skip/log.txt").read_text()
    assert (tmp_path / "skip/model_final.pth").is_file()


@pytest.mark.parametrize(
    "opts, expected",
    [
        (["SOLVER.BASE_LRR", "0.1"],
         "Unknown config key SOLVER.BASE_LRR in the command line; did you mean SOLVER.BASE_LR?"),
        (["MODEL.RESNETS.DEPHT", "101"], "did you mean MODEL.RESNETS.DEPTH?"),
        (["SOLVER.BASE_LR", "fast"], "Bad config value in the command line: Type mismatch"),
        (["SOLVER.BASE_LR"], "Expected KEY VALUE pairs"),
    ],
)  # fmt: skip
def test_config_errors(rel, train_net, tiny_dataset, output_dir, opts, expected):
    before = _snapshot(output_dir)
    assert expected in _error(train_net, _args(rel, output_dir, None, *opts))
    assert _snapshot(output_dir) == before


def test_config_file_errors(train_net, tmp_path):
    missing = tmp_path / "nope.yaml"
    message = _error(train_net, ["--config-file", missing])
    assert f"Config file {missing} does not exist" in message
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("SOLVER:\n  BASE_LRR: 0.1\n")
    message = _error(train_net, ["--config-file", bad_key])
    assert f"Unknown config key SOLVER.BASE_LRR in config file {bad_key}; did you mean" in message
    not_yaml = tmp_path / "not_yaml.yaml"
    not_yaml.write_text("SOLVER:\n  BASE_LR: [0.1\n")  # cut short
    assert f"Config file {not_yaml} is not valid YAML: " in _error(
        train_net, ["--config-file", not_yaml]
    )
    bad_base = tmp_path / "bad_base.yaml"
    bad_base.write_text('_BASE_: "missing_base.yaml"\n')
    message = _error(train_net, ["--config-file", bad_base])
    assert f"names a file that does not exist: {tmp_path / 'missing_base.yaml'}" in message


@pytest.fixture(scope="module")
def tiny_state(rel):
    """A state dict of the tiny config's model."""
    cfg = dcnv2.get_cfg(rel.QUICK, rel.TINY)
    cfg.MODEL.DEVICE = "cpu"
    from detectron2.modeling import build_model

    return build_model(cfg).state_dict()


def test_weights_errors(rel, train_net, tiny_dataset, tiny_state, output_dir, tmp_path):
    before = _snapshot(output_dir)

    def error(path, *opts):
        return _error(train_net, _args(rel, output_dir, None, "MODEL.WEIGHTS", path, *opts))

    missing = tmp_path / "missing.pth"
    assert f"Weights file {missing} (given by MODEL.WEIGHTS) does not exist" in error(missing)

    good = tmp_path / "good.pth"
    torch.save({"model": tiny_state}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    message = error(truncated)
    assert f"Cannot read weights file {truncated} ({truncated.stat().st_size} bytes, " in message
    assert "it is truncated or not a checkpoint" in message

    # A checkpoint of the same model with 5 classes: both predictor layers are listed.
    other = dict(tiny_state)
    other["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(6, 32)
    other["roi_heads.box_predictor.cls_score.bias"] = torch.zeros(6)
    mismatched = tmp_path / "five_classes.pth"
    torch.save({"model": other}, mismatched)
    message = error(mismatched)
    assert "2 tensor(s) of the weights (given by MODEL.WEIGHTS) do not fit the model:" in message
    assert (
        "roi_heads.box_predictor.cls_score.weight: (6, 32) in the file, (4, 32) in the model"
        in message
    )
    assert "roi_heads.box_predictor.cls_score.bias: (6,) in the file, (4,) in the model" in message
    assert "MODEL.DCNV2.ALLOW_SHAPE_MISMATCH True" in message

    unrelated = tmp_path / "unrelated.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, unrelated)
    assert "None of the 1 tensors of the weights (given by MODEL.WEIGHTS)" in error(unrelated)
    assert _snapshot(output_dir) == before


def test_shape_mismatch_can_be_allowed_for_fine_tuning_but_not_when_resuming(tiny_state, tmp_path):
    cfg = dcnv2.get_cfg(None, [])
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "wide.pth"
    torch.save({"model": {"weight": torch.ones(4, 3), "bias": torch.ones(2)}}, path)
    with pytest.raises(WeightsError, match=r"weight: \(4, 3\) in the file, \(2, 3\) in the model"):
        DCNv2Checkpointer(model).load(str(path))
    DCNv2Checkpointer(model, allow_shape_mismatch=True).load(str(path))
    assert torch.equal(model.bias.data, torch.ones(2))  # the tensor that fits was loaded
    ckpt = DCNv2Checkpointer(model, str(tmp_path), allow_shape_mismatch=True)
    (tmp_path / "last_checkpoint").write_text("wide.pth")
    with pytest.raises(WeightsError, match="must fit its model exactly"):
        ckpt.resume_or_load("", resume=True)
    assert cfg.MODEL.DCNV2.ALLOW_SHAPE_MISMATCH is False


def test_resume_with_a_dangling_pointer(rel, train_net, tiny_dataset, output_dir):
    (output_dir / "last_checkpoint").write_text("model_0000009.pth")
    before = _snapshot(output_dir)
    message = _error(train_net, _args(rel, output_dir, flags=["--resume"]))
    pointer = output_dir / "last_checkpoint"
    assert (
        f"Weights file {output_dir / 'model_0000009.pth'} (named by {pointer} (--resume)) does "
        "not exist; restore it, or start without --resume"
    ) in message
    assert _snapshot(output_dir) == before


@pytest.fixture
def readonly_dir(tmp_path):
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    # root ignores permission bits: make the folder immutable instead, where the FS allows it.
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a read-only folder as root here (chattr +i failed)")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_output_folder_not_writable(rel, train_net, tiny_dataset, readonly_dir, tmp_path):
    message = _error(train_net, _args(rel, readonly_dir))
    assert f"OUTPUT_DIR {readonly_dir} is not writable (" in message
    assert os.listdir(readonly_dir) == []
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    message = _error(train_net, _args(rel, a_file / "out"))
    assert f"OUTPUT_DIR {a_file / 'out'} is not writable (Not a directory)" in message
    assert a_file.read_text() == "keep"


def test_more_processes_than_gpus(rel, train_net, tiny_dataset, output_dir, monkeypatch):
    before = _snapshot(output_dir)
    if not torch.cuda.is_available():
        message = _error(train_net, _args(rel, output_dir, None, "MODEL.DEVICE", "cuda"))
        assert "MODEL.DEVICE is 'cuda' but no CUDA GPU is visible" in message
        assert "add MODEL.DEVICE cpu" in message
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(LaunchError, match=r"--num-gpus 2 but this machine has 1 CUDA GPU\(s\)"):
        check_devices("cuda", 2)
    check_devices("cuda", 1)
    with pytest.raises(LaunchError, match="MODEL.DEVICE is 'gpu0'; expected a torch device"):
        check_devices("gpu0", 1)
    message = _error(train_net, _args(rel, output_dir, None, "DATASETS.DCNV2.ON_BAD_DATA", "warn"))
    assert "DATASETS.DCNV2.ON_BAD_DATA is 'warn'; expected one of 'fail', 'skip'" in message
    message = _error(train_net, _args(rel, output_dir, flags=["--num-gpus", "0"]))
    assert "--num-gpus is 0; expected at least 1" in message
    assert _snapshot(output_dir) == before


def test_command_line_prints_one_line_and_no_traceback(rel, tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(rel.REPO, "train_net.py"), "--config-file", rel.QUICK,
         "SOLVER.BASE_LRR", "0.1", "OUTPUT_DIR", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        "train_net.py: error: Unknown config key SOLVER.BASE_LRR in the command line; did you "
        "mean SOLVER.BASE_LR?"
    ], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not os.path.exists(tmp_path / "out")


def test_weights_that_cannot_be_fetched(tmp_path, monkeypatch):
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path))  # nothing cached from an earlier try
    url = "https://127.0.0.1:9/model_final.pth"  # a closed local port: refused at once
    with pytest.raises(WeightsError, match=f"Cannot fetch weights {url} \\(given by MODEL.WEIGHTS"):
        DCNv2Checkpointer(torch.nn.Linear(2, 2)).load(url)


def _two_categories(coco, image_root):
    coco["categories"] = coco["categories"][:2]


def _renamed_category(coco, image_root):
    coco["categories"][2]["name"] = "blue"


def _no_annotations(coco, image_root):
    coco["annotations"] = []


def test_categories_must_match_the_model_and_the_other_split(
    rel, train_net, tiny_dataset, make_dataset, output_dir
):
    before = _snapshot(output_dir)
    name, json_file, _ = make_dataset(_two_categories)
    message = _error(train_net, _args(rel, output_dir, name))
    assert (
        f"Annotation file {json_file} has 2 categories (1:red, 2:green) but "
        "MODEL.ROI_HEADS.NUM_CLASSES is 3; expected them equal. Set MODEL.ROI_HEADS.NUM_CLASSES 2"
    ) in message
    # RetinaNet's own key.
    retina = ["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.RETINANET.NUM_CLASSES", "4"]
    message = _error(train_net, _args(rel, output_dir, None, *retina))
    assert "has 3 categories (1:red, 2:green, 3:x) but MODEL.RETINANET.NUM_CLASSES is 4" in message

    # The test set's categories differ from the training set's (same count).
    test_name, test_json, _ = make_dataset(_renamed_category)
    test = ["DATASETS.TEST", f"('{test_name}',)"]
    message = _error(train_net, _args(rel, output_dir, None, *test))
    assert f"and {test_json} list different categories" in message
    assert "(1:red, 2:green, 3:x vs 1:red, 2:green, 3:blue)" in message
    assert _snapshot(output_dir) == before


def test_training_set_without_annotations(rel, train_net, make_dataset, output_dir):
    before = _snapshot(output_dir)
    name, json_file, _ = make_dataset(_no_annotations)
    message = _error(train_net, _args(rel, output_dir, name))
    assert f"Annotation file {json_file} (training set {name!r}) has no annotations" in message
    assert _snapshot(output_dir) == before


def test_unknown_backend_and_batch_that_does_not_split(rel, train_net, tiny_dataset, output_dir):
    before = _snapshot(output_dir)
    message = _error(train_net, _args(rel, output_dir, None, "MODEL.DCNV2.BACKEND", "cudnn"))
    assert (
        "MODEL.DCNV2.BACKEND: Unknown deformable-conv backend 'cudnn'; expected one of 'auto', "
        "'detectron2', 'native', 'torchvision'"
    ) in message
    if not torch.cuda.is_available():
        message = _error(
            train_net, _args(rel, output_dir, None, "MODEL.DCNV2.BACKEND", "detectron2")
        )
        assert (
            "MODEL.DCNV2.BACKEND: Deformable-conv backend 'detectron2' is not available" in message
        )
    batch = ["SOLVER.IMS_PER_BATCH", "3"]
    message = _error(train_net, _args(rel, output_dir, None, *batch, flags=["--num-gpus", "2"]))
    assert (
        "SOLVER.IMS_PER_BATCH is 3, which does not split over 2 process(es) (--num-gpus x "
        "--num-machines); expected a positive multiple of 2"
    ) in message
    assert _snapshot(output_dir) == before
    assert not (output_dir / "log.txt.rank1").exists()
