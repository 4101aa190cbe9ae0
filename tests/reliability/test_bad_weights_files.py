"""A file that cannot be a checkpoint (a text file, an empty file, a .pth or .pkl cut in half, a
folder, a file this user cannot read), given as weights to any entry point: one
``<prog>: error:`` line naming the file and saying what was expected, exit status 2, nothing
written (the output folder or file is not created; an existing output folder keeps its bytes)."""

import contextlib
import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dcnv2.checkpoint.integrity import diagnose_file
from dcnv2.checkpoint.loading import load_checkpoint_file
from dcnv2.errors import WeightsError
from dcnv2.tools.cli import run_cli


def _tensors():
    return {"layer.weight": torch.arange(4096, dtype=torch.float32).reshape(64, 64)}


def _cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _text(path):
    path.write_text("not weights: a note\nsecond line\n")


def _empty(path):
    path.write_bytes(b"")


def _truncated_pth(path):
    torch.save({"model": _tensors()}, path)
    _cut_in_half(path)


def _truncated_pkl(path):
    arrays = {k: v.numpy() for k, v in _tensors().items()}
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "test"}, f, protocol=2)
    _cut_in_half(path)


def _folder(path):
    path.mkdir()


def _unreadable(path):
    torch.save({"model": _tensors()}, path)
    path.chmod(0o000)


# kind -> (suffix, make(path), what the message says)
KINDS = {
    "text": (".pth", _text, "it is a text file starting with 'not weights: a note'"),
    "empty": (".pth", _empty, "(0 bytes, {source}): the file is empty"),
    "truncated-pth": (".pth", _truncated_pth, "truncated: the zip archive's end record is missing"),
    "truncated-pkl": (
        ".pkl",
        _truncated_pkl,
        "truncated: the pickle's final STOP opcode is missing",
    ),
    "folder": (".pth", _folder, "({source}) is a folder; expected a .pth/.pkl checkpoint file"),
    "unreadable": (".pth", _unreadable, "({source}) is not readable: Permission denied"),
}
EXPECTED = "Expected a checkpoint written by torch.save (.pth) or a detectron2 model-zoo .pkl"


def _make(kind, folder, name="weights"):
    if kind == "unreadable" and os.geteuid() == 0:
        pytest.skip("root reads any file: a file without read permission needs another user")
    suffix, make, _ = KINDS[kind]
    path = folder / f"{name}{suffix}"
    make(path)
    return path


def _check_message(message, kind, path, source):
    _, _, says = KINDS[kind]
    assert str(path) in message, message
    assert says.format(source=source) in message, message
    if kind not in ("folder", "unreadable"):
        assert EXPECTED in message, message


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_reader_names_the_file_and_what_is_wrong(tmp_path, kind):
    path = _make(kind, tmp_path)
    with pytest.raises(WeightsError) as info:
        load_checkpoint_file(str(path), source="given by X")
    _check_message(str(info.value), kind, path, "given by X")
    assert "\n" not in str(info.value)


def test_whole_files_of_every_format_are_not_refused(tmp_path):
    # The control: the same files, not cut short, and the formats judged by their last bytes
    # (torch.save's legacy format has no final STOP; a protocol-0 pickle is text ending in ".").
    whole_pth, legacy, pkl, text_pickle = (
        tmp_path / n for n in ("a.pth", "b.pth", "c.pkl", "d.pkl")
    )
    torch.save({"model": _tensors()}, whole_pth)
    torch.save({"model": _tensors()}, legacy, _use_new_zipfile_serialization=False)
    arrays = {"model": {"w": np.arange(5.0)}, "__author__": "test"}
    with open(pkl, "wb") as f:
        pickle.dump(arrays, f, protocol=2)
    with open(text_pickle, "wb") as f:
        pickle.dump({"model": {"w": 1.5}}, f, protocol=0)
    for path in (whole_pth, legacy, pkl, text_pickle):
        assert diagnose_file(str(path)) is None, path
    assert torch.equal(
        load_checkpoint_file(str(legacy))["model"]["layer.weight"], _tensors()["layer.weight"]
    )
    assert load_checkpoint_file(str(text_pickle)) == {"model": {"w": 1.5}}
    np.testing.assert_array_equal(load_checkpoint_file(str(pkl))["model"]["w"], np.arange(5.0))


def test_a_download_that_returned_a_web_page_or_a_git_lfs_pointer_says_so(tmp_path):
    page = tmp_path / "model.pth"
    page.write_text("<!DOCTYPE html>\n<html><body>Not Found</body></html>\n")
    assert "a download that returned a web page" in diagnose_file(str(page))
    pointer = tmp_path / "lfs.pkl"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n")
    assert "git lfs pull" in diagnose_file(str(pointer))


def _one_error_line(prog, run):
    """Run ``run()`` (returns an exit status or raises SystemExit); the error line."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            status = run()
        except SystemExit as e:
            status = e.code
    message = stderr.getvalue()
    assert status == 2, message
    lines = message.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), message
    return lines[0]


def _snapshot(folder):
    return {f: (folder / f).is_file() and (folder / f).read_bytes() for f in os.listdir(folder)}


TRAIN_NET = ["train", "eval-only", "resume"]
TOOLS = ["convert_torchvision_to_d2.py", "convert_mmdet_to_d2.py", "publish_model.py", "demo.py"]


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("mode", TRAIN_NET)
def test_train_net(rel, train_net, tiny_dataset, tmp_path, kind, mode):
    out = tmp_path / "output"
    if mode == "resume":
        # The run's own folder: last_checkpoint names the bad file.
        out.mkdir()
        (out / "config.yaml").write_text("earlier")
        bad = _make(kind, out, "model_0000001")
        (out / "last_checkpoint").write_text(bad.name)
        source = f"named by {out / 'last_checkpoint'} (--resume)"
        argv = rel.tiny_args(out, flags=["--resume"])
    else:
        bad = _make(kind, tmp_path)
        source = "given by MODEL.WEIGHTS"
        flags = ["--eval-only"] if mode == "eval-only" else []
        argv = rel.tiny_args(out, "MODEL.WEIGHTS", str(bad), flags=flags)
    before = _snapshot(out) if out.exists() else None
    line = _one_error_line("train_net.py", lambda: train_net.invoke_main(argv))
    _check_message(line, kind, bad, source)
    if before is None:
        assert not out.exists()
    else:
        assert _snapshot(out) == before


def _tool(name):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", name)
    spec = importlib.util.spec_from_file_location(f"dcnv2_tool_{name[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("tool", TOOLS)
def test_tools(tmp_path, kind, tool):
    bad = _make(kind, tmp_path)
    out = tmp_path / "out"
    if tool == "demo.py":
        image = tmp_path / "image.png"
        Image.new("RGB", (40, 30)).save(image)
        argv = ["--input", str(image), "--output", str(out), "--opts", "MODEL.WEIGHTS", str(bad)]
        source = "given by MODEL.WEIGHTS"
    else:
        output = out / ("converted.pkl" if tool == "convert_torchvision_to_d2.py" else "x.pth")
        argv = [str(bad), str(output)]
        source = "publish_model's input" if tool == "publish_model.py" else "the converter's input"
    module = _tool(tool)
    line = _one_error_line(tool, lambda: run_cli(module.main, argv, prog=tool))
    _check_message(line, kind, bad, source)
    assert not out.exists()


def test_train_net_command_line(rel, tiny_dataset, tmp_path):
    bad = _make("truncated-pkl", tmp_path)
    out = tmp_path / "output"
    proc = subprocess.run(
        [sys.executable, os.path.join(rel.REPO, "train_net.py"),
         *rel.tiny_args(out, "DATASETS.TRAIN", "()", "MODEL.WEIGHTS", str(bad))],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("train_net.py: error: "), proc.stderr
    _check_message(errors[0], "truncated-pkl", bad, "given by MODEL.WEIGHTS")
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists()


def test_no_read_permission_is_named_whoever_runs_the_test(tmp_path, monkeypatch):
    # Root reads any file: a refused open stands in for the permission bits here.
    from dcnv2.checkpoint import integrity

    path = tmp_path / "weights.pth"
    torch.save({"model": _tensors()}, path)

    def refuse(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(integrity, "open", refuse, raising=False)
    with pytest.raises(WeightsError) as info:
        load_checkpoint_file(str(path), source="given by X")
    _check_message(str(info.value), "unreadable", path, "given by X")
    assert str(info.value).endswith("expected a file this user can read")
