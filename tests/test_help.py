"""--help of train_net.py and every tool: exit status 0, a usage line, and the docstring's examples
with their line continuations kept."""

import glob
import os
import runpy
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["train_net.py"] + sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "tools", "*.py"))
)


def _help(script, monkeypatch, capsys) -> str:
    path = os.path.join(REPO, script)
    monkeypatch.setattr(sys, "argv", [path, "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(path, run_name="__main__")
    assert e.value.code == 0
    return capsys.readouterr().out


def test_every_tool_is_listed():
    assert len(SCRIPTS) >= 10 and os.path.join("tools", "demo.py") in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_works_and_keeps_line_continuations(script, monkeypatch, capsys):
    out = _help(script, monkeypatch, capsys)
    assert out.startswith(f"usage: {os.path.basename(script)} ")
    with open(os.path.join(REPO, script)) as f:
        docstring = f.read().split('"""')[1]
    if " \\\n" in docstring:  # the examples continue lines
        assert " \\\n" in out, out


def test_generate_synthetic_dataset_help_states_the_registered_defaults(monkeypatch, capsys):
    from dcnv2.data.synthetic import SPLITS

    out = _help(os.path.join("tools", "generate_synthetic_dataset.py"), monkeypatch, capsys)
    out = " ".join(out.split())
    assert f"training images (default: {SPLITS['train'][0]})" in out
    assert f"validation images (default: {SPLITS['val'][0]})" in out
    assert f"(default: {SPLITS['train'][1]})" in out
