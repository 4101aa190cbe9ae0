"""tools/setup_env.sh's offline modes: --download-wheels then --install-from into a fresh venv
with pip --no-index (a small subset of the wheels, to stay cheap). Skipped without a package
index."""

import json
import os
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tools", "setup_env.sh")
# Every downloadable name but yacs (and its PyYAML), termcolor and one sdist-only package.
KEEP = {"termcolor", "yacs", "pyyaml", "antlr4-python3-runtime"}


def _skip_list() -> str:
    text = open(SCRIPT).read()
    names = []
    for var in ("OFFLINE_SDIST_ONLY", "OFFLINE_WHEELS"):
        value = text.split(f'{var}="', 1)[1].split('"', 1)[0]
        names += [n.split("==")[0] for n in value.split()]
    return " ".join(n for n in names if n not in KEEP)


def _run(args, env, timeout=300):
    return subprocess.run(
        ["bash", SCRIPT, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.timeout(600)
def test_download_then_offline_install_into_a_fresh_venv(tmp_path):
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "termcolor", "-d",
         str(tmp_path / "probe")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"package index unreachable: {probe.stderr.strip()[-200:]}")
    wheels = tmp_path / "wheels"
    env = dict(os.environ, PYTHON=sys.executable, DCNV2_D2_WHEEL="0")
    env["DCNV2_WHEELS_SKIP"] = _skip_list()
    pyver = "%d.%d" % sys.version_info[:2]
    proc = _run(["--download-wheels", str(wheels), "--python-version", pyver], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = sorted(p.split("-")[0] for p in os.listdir(wheels) if p.endswith(".whl"))
    assert names == ["antlr4_python3_runtime", "pyyaml", "termcolor", "yacs"]
    assert (wheels / "requirements.txt").read_text().split() == ["yacs", "termcolor"]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    # No index from here on: a package missing from the folder would fail the install.
    env = dict(os.environ, PYTHON=python, PIP_INDEX_URL="http://127.0.0.1:9/simple")
    env.pop("PYTHONPATH", None)
    proc = _run(["--install-from", str(wheels)], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no detectron2" in proc.stdout
    check = subprocess.run(
        [python, "-c", "import yacs, termcolor, importlib.util as u; "
         "print(u.find_spec('dcnv2').origin)"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert check.stdout.strip() == os.path.join(REPO, "projects", "dcnv2", "__init__.py")


def test_bad_arguments_are_one_error_line(tmp_path):
    for args, message in (
        (["--frobnicate"], "unknown argument --frobnicate"),
        (["--install-from", str(tmp_path / "none")], "no folder"),
        (["--install-from", str(tmp_path)], "requirements.txt not found"),
    ):
        proc = _run(args, dict(os.environ, PYTHON=sys.executable), timeout=60)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert (
            len(lines) == 1 and lines[0].startswith("setup_env.sh: error: ") and message in lines[0]
        )


def _requires_dist(tmp_path):
    """The package's ``Requires-Dist``, as pip builds its metadata from setup.py."""
    report = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index",
         "--no-build-isolation", "--quiet", "--report", str(report), REPO],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (item,) = json.loads(report.read_text())["install"]
    return [Requirement(r) for r in item["metadata"]["requires_dist"]]


def test_installing_the_package_keeps_numpy_below_2(tmp_path):
    # detectron2 0.7 does not support numpy 2; a plain `pip install -e .` must not bring it.
    numpy = [r for r in _requires_dist(tmp_path) if r.name == "numpy" and not r.marker]
    assert len(numpy) == 1
    assert not numpy[0].specifier.contains("2.0.0") and not numpy[0].specifier.contains("2.5.1")
    assert numpy[0].specifier.contains("1.26.4")


def _fake_distribution(site: str, name: str, version: str) -> None:
    info = os.path.join(site, f"{name}-{version}.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    open(os.path.join(info, "RECORD"), "w").close()


@pytest.mark.timeout(600)
def test_the_gpu_machine_path_keeps_its_numpy_2(tmp_path):
    # --install-from (the GPU machine's set-up: detectron2 built from source, numpy 2 there)
    # installs dcnv2 without its dependencies, so numpy<2 leaves that numpy alone.
    text = open(SCRIPT).read()
    assert '"${pip[@]}" --no-deps --no-build-isolation -e "$ROOT"' in text
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    _fake_distribution(site, "numpy", "2.5.1")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "requirements.txt").write_text("")
    env = dict(os.environ, PYTHON=python, PIP_INDEX_URL="http://127.0.0.1:9/simple")
    env.pop("PYTHONPATH", None)
    proc = _run(["--install-from", str(wheels)], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check = subprocess.run(
        [python, "-c", "import importlib.metadata as m, importlib.util as u; "
         "print(m.version('numpy'), u.find_spec('dcnv2').origin)"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    dcnv2 = os.path.join(REPO, "projects", "dcnv2", "__init__.py")
    assert check.stdout.split() == ["2.5.1", dcnv2]
