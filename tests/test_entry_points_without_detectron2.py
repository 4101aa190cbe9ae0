"""train_net.py and every tools/*.py, run in a Python without detectron2: one
``<prog>: error: dcnv2 needs detectron2 ...`` line saying how to install it, exit status 2, no
ModuleNotFoundError traceback (detectron2 is hidden from the import system in the subprocess)."""

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = ["train_net.py"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tools", "*.py"))
)

# After the prelude that hides detectron2 (conftest.HIDE_DETECTRON2): run the script as __main__.
_RUN_SCRIPT = """
import runpy, sys

sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_every_tool_is_listed():
    assert len(ENTRY_POINTS) >= 10 and "tools/demo.py" in ENTRY_POINTS


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_without_detectron2_one_line_says_how_to_install_it(script, hide_detectron2):
    proc = subprocess.run(
        [sys.executable, "-c", hide_detectron2 + _RUN_SCRIPT, os.path.join(ROOT, script), "x"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "warn" not in line.lower()]
    prog = os.path.basename(script)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prog}: error: dcnv2 needs detectron2, which this Python "), lines
    assert "`bash tools/setup_env.sh`" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
