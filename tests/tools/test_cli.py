"""dcnv2.tools.cli's known-message filters: they drop exactly the known third-party messages, every
tool has them before its main runs and prints none of the messages, and pytest.ini ignores the
same warnings."""

import configparser
import logging
import os
import re
import subprocess
import sys
import warnings

import numpy as np
from PIL import Image

from dcnv2.tools import cli
from dcnv2.tools.cli import KNOWN_LOG_MESSAGES, KNOWN_WARNINGS, run_cli, silence_known_warnings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MESSAGES = {
    "jit": "`torch.jit.script` is deprecated",
    "meshgrid": "torch.meshgrid: in an upcoming release",
    "fx": "is_fx_tracing will return true",
    "cuda_home": "No CUDA runtime is found",
}
TINY = ["MODEL.WEIGHTS", "", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"]
TINY += ["MODEL.RPN.POST_NMS_TOPK_TEST", "20"]
# The work the tools do, without an entry point's filters: detectron2 imported before dcnv2, the
# model called directly.
UNFILTERED = """
import detectron2.modeling, torch
import dcnv2
cfg = dcnv2.get_cfg(
    dcnv2.get_config_file("faster_rcnn_R50_mdconv_FPN_1x.yaml"), {opts!r} + ["MODEL.DEVICE", "cpu"]
)
with torch.no_grad():
    detectron2.modeling.build_model(cfg).eval()([{{"image": torch.zeros(3, 64, 96)}}])
"""


def _run(args):
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_the_tools_print_none_of_the_known_messages(tmp_path):
    unfiltered = _run(["-c", UNFILTERED.format(opts=TINY)])
    # Not vacuous: the same work prints them without the filters (is_fx_tracing only with a
    # torch that has the message, CUDA_HOME only with CUDA tools and no GPU).
    assert MESSAGES["jit"] in unfiltered and MESSAGES["meshgrid"] in unfiltered, unfiltered
    image = tmp_path / "in.png"
    Image.fromarray(np.full((64, 96, 3), 128, dtype=np.uint8)).save(image)
    sampling = [os.path.join("tools", "visualize_sampling.py"), "--input", str(image)]
    sampling += ["--output", str(tmp_path / "s.png"), "--points", "10,10", "--layers", "1"]
    export = [os.path.join("tools", "export_model.py"), "--format", "torchscript"]
    export += ["--output", str(tmp_path / "m.ts"), "--height", "64", "--width", "96"]
    for args in (sampling + ["--opts", *TINY], export + ["--opts", *TINY]):
        stderr = _run(args)
        assert [m for m in MESSAGES.values() if m in stderr] == [], stderr[-3000:]


def test_only_the_known_messages_are_dropped(caplog):
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            silence_known_warnings()
            silence_known_warnings()  # a second call adds nothing
            for category, message in KNOWN_WARNINGS:
                warnings.warn(f"{message}, and more", category, stacklevel=1)
            warnings.warn(f"{KNOWN_WARNINGS[0][1]} as a UserWarning", UserWarning, stacklevel=1)
            warnings.warn("another FutureWarning", FutureWarning, stacklevel=1)
        assert [str(w.message) for w in caught] == [
            f"{KNOWN_WARNINGS[0][1]} as a UserWarning",
            "another FutureWarning",
        ]
        for name, message in KNOWN_LOG_MESSAGES.items():
            logger = logging.getLogger(name)
            assert logger.filters == [cli._not_known]
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger=name):
                logger.warning("%s, using '%s'", message, "x")
                logger.warning("something else")
                logging.getLogger("dcnv2.test").warning(message)  # another logger's: kept
            assert [r.getMessage() for r in caplog.records] == ["something else", message]
    finally:
        for name in KNOWN_LOG_MESSAGES:
            logging.getLogger(name).removeFilter(cli._not_known)


def test_run_cli_silences_the_known_messages_before_main():
    seen = []

    def main(argv):
        warnings.warn(
            "`torch.jit.script` is deprecated. Please switch", FutureWarning, stacklevel=1
        )
        warnings.warn("any other warning", FutureWarning, stacklevel=1)
        seen.append(cli._not_known in logging.getLogger("torch.fx._symbolic_trace").filters)
        return 0

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert run_cli(main, [], prog="tool.py") == 0
        assert [str(w.message) for w in caught] == ["any other warning"] and seen == [True]
    finally:
        for name in cli.KNOWN_LOG_MESSAGES:
            logging.getLogger(name).removeFilter(cli._not_known)


def test_pytest_ini_ignores_the_known_warnings():
    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "pytest.ini"))
    lines = [line.strip() for line in parser["pytest"]["filterwarnings"].splitlines() if line]
    ignored = [line.split(":") for line in lines if line.startswith("ignore:")]
    for category, message in KNOWN_WARNINGS:
        assert any(
            re.match(regex, message) and name == category.__name__ for _, regex, name in ignored
        ), message
    assert len(ignored) == len(KNOWN_WARNINGS)
