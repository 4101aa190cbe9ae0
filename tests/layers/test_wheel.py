"""A wheel built from the checkout and installed elsewhere carries every file the compiled op needs:
the op builds from the installed sources (and their headers), not from the checkout."""

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_installed_wheel_builds_the_compiled_op(tmp_path):
    # Built from a copy, so that the checkout gets no build/ or egg-info of its own.
    src = tmp_path / "src"
    shutil.copytree(
        ROOT / "projects", src / "projects", symlinks=True,
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
    )  # fmt: skip
    shutil.copytree(ROOT / "configs", src / "configs")
    for name in ("setup.py", "README.md", "MANIFEST.in"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run(
        pip + ["wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(wheels)],
        check=True, cwd=src, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = wheels.glob("dcnv2-*.whl")
    csrc = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("dcnv2/layers/csrc/")}
    assert csrc == {
        f"dcnv2/layers/csrc/{n}" for n in os.listdir(src / "projects/dcnv2/layers/csrc")
    }
    # Installing a pure-Python wheel is unpacking it (what pip install --target does).
    zipfile.ZipFile(wheel).extractall(target)
    script = textwrap.dedent("""
        from dcnv2.layers import native_cpp
        assert native_cpp.is_available(warn=False), native_cpp.error()
        print("\\n".join(native_cpp._EXTENSION.sources))
        """)
    env = dict(os.environ, PYTHONPATH=str(target), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    env.pop("DCNV2_NATIVE_IMPL", None)
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=500,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    sources = run.stdout.split()
    assert sources and all(Path(s).is_relative_to(target) for s in sources), sources
