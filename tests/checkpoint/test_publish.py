"""tools/publish_model.py and dcnv2.checkpoint.publish: weights only, half precision, the sha256
prefix in the name, atomic and never overwriting without --force, loadable by --eval-only."""

import hashlib
import importlib.util
import os

import pytest
import torch
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model

from dcnv2 import get_cfg
from dcnv2.checkpoint import build_checkpointer
from dcnv2.checkpoint.publish import publish_model
from dcnv2.engine.preflight import check_before_launch
from dcnv2.errors import WeightsError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = "quick/faster_rcnn_R50_mdconv_FPN_instant.yaml"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A training checkpoint as the trainer writes it: model, optimizer with momentum, scheduler,
    iteration."""
    torch.manual_seed(0)
    model = build_model(get_cfg(QUICK))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    path = str(tmp_path_factory.mktemp("run") / "model_final.pth")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(
        {"model": state, "optimizer": optimizer.state_dict(), "scheduler": {"last_epoch": 4},
         "iteration": 4},
        path,
    )  # fmt: skip
    return path, state


@pytest.mark.parametrize("half", [False, True])
def test_weights_only_with_the_sha256_in_the_name(checkpoint, tmp_path, half):
    source, state = checkpoint
    path, info = publish_model(source, str(tmp_path / "pub" / "seed.pth"), half=half)
    data = open(path, "rb").read()
    digest = hashlib.sha256(data).hexdigest()
    assert path == str(tmp_path / "pub" / f"seed-{digest[:8]}.pth") and info["sha256"] == digest
    assert info["dropped"] == ["iteration", "optimizer", "scheduler"]
    published = torch.load(path, weights_only=True)
    assert set(published) == {"model"} and set(published["model"]) == set(state)
    for key, value in state.items():
        expected = value.half() if half and value.is_floating_point() else value
        assert published["model"][key].dtype == expected.dtype, key
        assert torch.equal(published["model"][key], expected), key
    # SGD momentum doubles a checkpoint; float16 halves the rest.
    assert len(data) < os.path.getsize(source) / (3.8 if half else 1.9)
    assert not [f for f in os.listdir(tmp_path / "pub") if f.endswith(".tmp")]


def test_published_half_weights_load_for_eval_only(checkpoint, tmp_path):
    source, state = checkpoint
    path, _ = publish_model(source, str(tmp_path / "seed.pth"), half=True)
    cfg = get_cfg(QUICK, ["MODEL.WEIGHTS", path])
    model = build_model(cfg)
    build_checkpointer(cfg, model).load(path)
    for key, value in model.state_dict().items():
        expected = state[key].half().to(value.dtype) if value.is_floating_point() else state[key]
        assert torch.equal(value, expected), key
    # train_net.py's checks before --eval-only: the file fits the model.
    argv = ["--config-file", QUICK, "--eval-only", "MODEL.WEIGHTS", path, "DATASETS.TRAIN", "()",
            "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "out")]  # fmt: skip
    check_before_launch(default_argument_parser().parse_args(argv))


def test_existing_output_needs_force(checkpoint, tmp_path):
    source, _ = checkpoint
    path, _ = publish_model(source, str(tmp_path / "seed.pth"))
    with pytest.raises(WeightsError, match="exists; pass --force to replace it"):
        publish_model(source, str(tmp_path / "seed.pth"))
    assert publish_model(source, str(tmp_path / "seed.pth"), force=True)[0] == path


def _tool():
    spec = importlib.util.spec_from_file_location(
        "dcnv2_tool_publish", os.path.join(ROOT, "tools", "publish_model.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_prints_the_file_and_fails_in_one_line(checkpoint, tmp_path, capsys):
    from dcnv2.tools.cli import run_cli

    tool = _tool()
    source, _ = checkpoint
    assert run_cli(tool.main, [source, str(tmp_path / "m.pth"), "--half"], prog=tool.PROG) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path}/m-" in out and "dropped iteration, optimizer, scheduler" in out
    assert run_cli(tool.main, [str(tmp_path / "nope.pth"), "x.pth"], prog=tool.PROG) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"publish_model.py: error: input checkpoint '{tmp_path}/nope.pth' does not exist or is "
        "not a file"
    ]
