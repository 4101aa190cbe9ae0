"""tools/setup_env.sh's offline modes: --download-wheels then --install-from into a fresh venv
with pip --no-index (a small subset of the wheels, to stay cheap). Skipped without a package
index."""

import os
import subprocess
import sys

import pytest

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
