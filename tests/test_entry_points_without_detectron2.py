"""train_net.py and every tools/*.py in a Python without detectron2 (``-S``: no site-packages):
the first import of dcnv2 fails with one DependencyMissingError that says how to install it."""

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = ["train_net.py"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tools", "*.py"))
)
# dcnv2 from the checkout, nothing from site-packages.
BARE = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "projects"))


def test_every_tool_is_listed():
    assert len(ENTRY_POINTS) >= 10 and os.path.join("tools", "demo.py") in ENTRY_POINTS


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_without_detectron2_the_error_says_how_to_install_it(script):
    proc = subprocess.run(
        [sys.executable, "-S", os.path.join(ROOT, script), "--help"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=BARE,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "dcnv2.errors.DependencyMissingError: dcnv2 needs detectron2, which this Python "
        f"({sys.executable}) cannot import (No module named 'detectron2')."
    ), proc.stderr
    assert "`bash tools/setup_env.sh`" in last
    assert "During handling of the above exception" not in proc.stderr  # no chained errors
