"""One overwrite option across the tools: a tool that writes a file refuses an existing output
without --force (one error line, exit status 2, the file unchanged) and replaces it with
--force; the converters' former --overwrite still works, hidden, with one deprecation line."""

import glob
import importlib.util
import json
import os

import pytest
import torch
import torchvision

from dcnv2.tools.cli import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"_force_{name}", f"{REPO}/tools/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _refused_then_forced(tool, prog, args, out, capsys, flag="--force"):
    with open(out, "wb") as f:
        f.write(b"precious")
    assert run_cli(tool.main, args, prog=prog) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"{prog}: error: "), err
    assert "--force" in err and repr(out) in err
    with open(out, "rb") as f:
        assert f.read() == b"precious"
    assert run_cli(tool.main, [*args, flag], prog=prog) == 0
    with open(out, "rb") as f:
        assert f.read() != b"precious"
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tv") / "r50.pth")
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


def test_convert_torchvision_force_and_the_deprecated_overwrite(resnet50_file, tmp_path, capsys):
    tool, prog = _tool("convert_torchvision_to_d2"), "convert_torchvision_to_d2.py"
    out = str(tmp_path / "r50.pkl")
    assert _refused_then_forced(tool, prog, [resnet50_file, out], out, capsys) == ""
    err = _refused_then_forced(tool, prog, [resnet50_file, out], out, capsys, "--overwrite")
    # One line (argparse's prog: the script's name when run as one).
    assert err.count("\n") == 1 and err.endswith(
        ": warning: --overwrite is deprecated; use --force\n"
    )


def test_plot_metrics_force(tmp_path, capsys):
    metrics = tmp_path / "metrics.json"
    rows = [{"iteration": i, "total_loss": 2.0 / (i + 1), "lr": 0.01} for i in range(5)]
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = str(tmp_path / "curves.png")
    _refused_then_forced(_tool("plot_metrics"), "plot_metrics.py", [str(metrics), "--out", out],
                         out, capsys)  # fmt: skip


@pytest.mark.parametrize(
    "name", sorted(os.path.basename(p)[:-3] for p in glob.glob(f"{REPO}/tools/*.py"))
)
def test_no_tool_offers_overwrite_under_another_name(name, capsys):
    tool = _tool(name)
    if not hasattr(tool, "parse_args"):
        pytest.skip(f"{name} has no parser of its own")
    with pytest.raises(SystemExit):
        tool.parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert "--overwrite" not in help_text and "--replace" not in help_text
    with open(f"{REPO}/tools/{name}.py") as f:
        source = f.read()
    if "force" in source:
        assert "--force" in help_text
