"""tools/setup_env.sh: its offline modes (--download-wheels then --install-from into a fresh venv
with pip --no-index, a small subset of the wheels to stay cheap; skipped without a package index),
its retagging of the sal-detectron2 wheel, and the package's own requirements."""

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile

import pytest
from packaging.requirements import Requirement

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tools", "setup_env.sh")
# Every downloadable name but pip, setuptools, yacs (and its PyYAML), termcolor and one sdist-only
# package.
KEEP = {"pip", "setuptools", "termcolor", "yacs", "pyyaml", "antlr4-python3-runtime"}


def _skip_list() -> str:
    text = open(SCRIPT).read()
    names = []
    for var in ("OFFLINE_SDIST_ONLY", "OFFLINE_WHEELS"):
        value = text.split(f'{var}="', 1)[1].split('"', 1)[0]
        value = value.replace("$SETUPTOOLS_PIN", "setuptools")
        names += [re.split("[<=>]", n)[0] for n in value.split()]
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
    assert names == ["antlr4_python3_runtime", "pip", "pyyaml", "setuptools", "termcolor", "yacs"]
    requirements = (wheels / "requirements.txt").read_text().split()
    assert requirements == ["setuptools<81", "yacs", "termcolor"]
    (pip_wheel,) = [p for p in os.listdir(wheels) if p.startswith("pip-")]

    venv = tmp_path / "venv"
    # The venv's pip is the interpreter's bundled one, which --install-from upgrades offline.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    # No index from here on: a package missing from the folder would fail the install.
    env = dict(os.environ, PYTHON=python, PIP_INDEX_URL="http://127.0.0.1:9/simple")
    env.pop("PYTHONPATH", None)
    proc = _run(["--install-from", str(wheels)], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no detectron2" in proc.stdout
    check = subprocess.run(
        [python, "-W", "ignore", "-c", "import yacs, termcolor, pkg_resources; "
         "import importlib.metadata as m, importlib.util as u; "
         "print(u.find_spec('dcnv2').origin, m.version('pip'), m.version('setuptools'))"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    origin, pip_version, setuptools_version = check.stdout.split()
    assert origin == os.path.join(REPO, "projects", "dcnv2", "__init__.py")
    assert pip_version == pip_wheel.split("-")[1]
    assert int(setuptools_version.split(".")[0]) < 81


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


def test_the_package_takes_numpy_1_or_2_and_any_opencv(tmp_path):
    requires = {r.name: r for r in _requires_dist(tmp_path) if not r.marker}
    for version in ("1.26.4", "2.0.0", "2.5.1"):
        assert requires["numpy"].specifier.contains(version)
    for version in ("4.10.0.84", "5.1.0.95"):
        assert requires["opencv-python-headless"].specifier.contains(version)


def _sal_like_wheel(folder) -> str:
    """A wheel laid out as sal-detectron2 0.7.2's: cp310 tag, a _C binary, numpy<2."""
    path = os.path.join(folder, "sal_detectron2-0.7.2-cp310-none-any.whl")
    info = "sal_detectron2-0.7.2.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("detectron2/__init__.py", '__version__ = "0.7.2"\n')
        z.writestr("detectron2/_C.cpython-310-x86_64-linux-gnu.so", b"\x7fELF")
        z.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp310-none-any\n"
        )
        z.writestr(
            f"{info}/METADATA",
            "Metadata-Version: 2.1\nName: sal-detectron2\nVersion: 0.7.2\n"
            "Requires-Dist: tabulate\nRequires-Dist: numpy<2\nRequires-Dist: packaging\n",
        )
        z.writestr(f"{info}/RECORD", "")
    return path


def test_retagged_sal_wheel_is_py3_without_the_binary_and_the_numpy_pin(tmp_path):
    src = _sal_like_wheel(tmp_path)
    # The script's own function, run alone.
    proc = subprocess.run(
        ["bash", "-c", f'eval "$(sed -n "/^retag_sal_wheel()/,/^}}/p" {SCRIPT})"; '
         f'retag_sal_wheel {sys.executable} {src}'],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(tmp_path) == ["sal_detectron2-0.7.2-py3-none-any.whl"]
    with zipfile.ZipFile(tmp_path / "sal_detectron2-0.7.2-py3-none-any.whl") as z:
        info = "sal_detectron2-0.7.2.dist-info"
        assert "Tag: py3-none-any" in z.read(f"{info}/WHEEL").decode()
        requires = re.findall(r"Requires-Dist: (.*)", z.read(f"{info}/METADATA").decode())
        assert requires == ["tabulate", "numpy", "packaging"]
        record = z.read(f"{info}/RECORD").decode().splitlines()
        assert sorted(z.namelist()) == sorted(line.split(",")[0] for line in record)
        for line in record[:-1]:
            name, digest, size = line.split(",")
            data = z.read(name)
            sha = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert digest == f"sha256={sha}" and int(size) == len(data)


def _fake_distribution(site: str, name: str, version: str) -> None:
    info = os.path.join(site, f"{name}-{version}.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    open(os.path.join(info, "RECORD"), "w").close()


@pytest.mark.timeout(600)
def test_the_gpu_machine_path_keeps_its_numpy_2(tmp_path):
    # --install-from (the GPU machine's set-up: detectron2 built from source, numpy 2 there)
    # installs dcnv2 without its dependencies, so the machine's numpy stays as it is.
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
