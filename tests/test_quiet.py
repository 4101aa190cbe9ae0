"""Quiet by default: the messages torch/fvcore/detectron2 print on every run (dcnv2.quiet) are
dropped where dcnv2's imports and calls cause them, and only there."""

import logging
import os
import subprocess
import sys
import warnings

from dcnv2.quiet import KNOWN_LOG_MESSAGES, known_messages_silenced

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGES = {
    "jit": "`torch.jit.script` is deprecated",
    "cuda_home": "No CUDA runtime is found, using CUDA_HOME",
    "meshgrid": "torch.meshgrid: in an upcoming release",
    "fx": "is_fx_tracing will return true",
}
# A tiny model through dcnv2's Predictor (the tools' path), native C++ backend (built on first
# use: imports torch.utils.cpp_extension).
PREDICT = """
from dcnv2.engine.predictor import Predictor
from dcnv2.tools.cli import setup_cfg
import numpy as np
cfg = setup_cfg("quick/faster_rcnn_R50_mdconv_FPN_instant.yaml", [
    "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.FPN.NORM", "", "MODEL.DCNV2.BACKEND", "native",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"])
Predictor(cfg)(np.zeros((64, 80, 3), dtype=np.uint8))
print("predicted")
"""
# The same calls made without dcnv2's quieting: detectron2 imported first, the model called
# directly, cpp_extension imported directly.
UNQUIET = """
import detectron2.modeling, torch, numpy as np
import torch.utils.cpp_extension
import dcnv2
from dcnv2.tools.cli import setup_cfg
from detectron2.modeling import build_model
cfg = setup_cfg("quick/faster_rcnn_R50_mdconv_FPN_instant.yaml", [
    "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.FPN.NORM", "", "MODEL.DCNV2.BACKEND", "native"])
model = build_model(cfg).eval()
with torch.no_grad():
    model([{"image": torch.zeros(3, 64, 80)}])
print("predicted")
"""


def _stderr(code):
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and "predicted" in proc.stdout, proc.stderr[-3000:]
    return proc.stderr


def test_a_prediction_through_dcnv2_prints_none_of_the_known_messages():
    unquiet = _stderr(UNQUIET)
    # Not vacuous: in this environment the same work prints them (CUDA_HOME only on machines
    # with CUDA tools and no GPU; is_fx_tracing only with a torch that has the message).
    printed = [k for k, m in MESSAGES.items() if m in unquiet]
    assert {"jit", "meshgrid"} <= set(printed), unquiet[-3000:]
    quiet = _stderr(PREDICT)
    assert [k for k in printed if MESSAGES[k] in quiet] == [], quiet[-3000:]


def test_only_the_known_messages_are_dropped_and_only_inside(caplog):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with known_messages_silenced():
            warnings.warn(
                "`torch.jit.script` is deprecated. Please switch", FutureWarning, stacklevel=1
            )
            warnings.warn(
                "`torch.jit.script` is deprecated, but a UserWarning", UserWarning, stacklevel=1
            )
            warnings.warn("another FutureWarning", FutureWarning, stacklevel=1)
        warnings.warn(
            "`torch.jit.script` is deprecated. Please switch", FutureWarning, stacklevel=1
        )
    assert [str(w.message) for w in caught] == [
        "`torch.jit.script` is deprecated, but a UserWarning",
        "another FutureWarning",
        "`torch.jit.script` is deprecated. Please switch",
    ]
    name, _ = KNOWN_LOG_MESSAGES[0]
    logger = logging.getLogger(name)
    with caplog.at_level(logging.WARNING, logger=name):
        with known_messages_silenced():
            logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
            logger.warning("something else")
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr")
    assert [r.getMessage() for r in caplog.records] == [
        "something else",
        "No CUDA runtime is found, using CUDA_HOME='/usr'",
    ]
    assert logger.filters == []
