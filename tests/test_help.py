"""--help of train_net.py and every tool: it works, keeps the examples' line continuations, and
builds its parser without importing torch or detectron2 (so it answers at once; no time is
asserted). import dcnv2 alone stays light and still registers its components."""

import glob
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["train_net.py"] + sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "tools", "*.py"))
)
# Parses its command line in its heavy module (GPU machines only); see the README.
HEAVY_HELP = {os.path.join("tools", "gpu_check.py")}

HELP_WITHOUT_HEAVY_IMPORTS = """
import contextlib, io, runpy, sys
sys.argv = [{script!r}, "--help"]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        runpy.run_path({script!r}, run_name="__main__")
    except SystemExit as e:
        assert e.code == 0, e.code
heavy = sorted(m for m in ("torch", "detectron2", "fvcore") if m in sys.modules)
assert not heavy, heavy
print(out.getvalue())
"""


def _python(code_or_args, **kw):
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300, **kw
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_works_and_keeps_line_continuations(script):
    if script in HEAVY_HELP:
        proc = _python([script, "--help"])
    else:
        proc = _python(HELP_WITHOUT_HEAVY_IMPORTS.format(script=script))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
    with open(os.path.join(REPO, script)) as f:
        source = f.read()
    if " \\\n" in source.split('"""')[1]:  # the docstring's examples continue lines
        assert " \\\n" in proc.stdout, proc.stdout


def test_generate_synthetic_dataset_help_states_the_registered_defaults():
    from dcnv2.data.synthetic import SPLITS

    out = _python([os.path.join("tools", "generate_synthetic_dataset.py"), "--help"]).stdout
    out = " ".join(out.split())
    assert f"training images (default: {SPLITS['train'][0]})" in out
    assert f"validation images (default: {SPLITS['val'][0]})" in out
    assert f"(default: {SPLITS['train'][1]})" in out


def test_import_dcnv2_is_light_and_still_registers():
    code = (
        "import sys\n"
        "import dcnv2, dcnv2.tools.cli\n"
        "assert 'torch' not in sys.modules and 'detectron2' not in sys.modules\n"
        "from detectron2.modeling import BACKBONE_REGISTRY, ROI_HEADS_REGISTRY\n"
        "from detectron2.data import DatasetCatalog\n"
        "assert 'build_dcnv2_resnet_fpn_backbone' in BACKBONE_REGISTRY\n"
        "assert 'DCNv2StandardROIHeads' in ROI_HEADS_REGISTRY\n"
        "assert 'dcnv2_synthetic_train' in DatasetCatalog.list()\n"
        "assert dcnv2.get_cfg is dcnv2.config.get_cfg and 'get_cfg' in dir(dcnv2)\n"
        "try:\n"
        "    dcnv2.nothing\n"
        "except AttributeError as e:\n"
        "    print(e)\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "module 'dcnv2' has no attribute 'nothing'"
