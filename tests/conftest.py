"""Test-suite hygiene shared by every test folder, and the tiny-config overrides that
several test files use (as fixtures: importlib mode cannot import conftest)."""

import logging

import pytest

# The embedded default (configs/quick) shrunk for runs whose test is about the wiring, not the
# recipe: 128-px images, small sampling and proposal budgets, 2 images per batch, no loader
# workers, no periodic checkpoint. Tests add what their subject needs (tests/reliability: a
# narrow network on 64-px images).
TINY_OPTS = (
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "192",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.CHECKPOINT_PERIOD", "100000",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "64",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "100", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "100", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    "DATALOADER.NUM_WORKERS", "0",
)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_opts() -> tuple:
    """:data:`TINY_OPTS`, config overrides (``KEY VALUE`` pairs) of the embedded default (a tuple:
    shared, immutable)."""
    return TINY_OPTS


@pytest.fixture
def unbuildable_extension(monkeypatch):
    """A function that gives a JIT-extension module (``native_cpp``, ``mdpool_cpp``) a fresh, not
    yet built copy of its extension whose build fails (no compiler), for this test."""
    from torch.utils import cpp_extension

    from dcnv2.layers.extension import JitExtension

    def no_compiler(**kwargs):
        raise RuntimeError("no compiler")

    def swap(module) -> None:
        monkeypatch.setattr(cpp_extension, "load", no_compiler)
        real = module._EXTENSION
        fresh = JitExtension(
            real.name, real.sources, real.probe, real.what, real.fallback, real.logger
        )
        monkeypatch.setattr(module, "_EXTENSION", fresh)

    return swap


def _loggers():
    yield logging.getLogger()
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            yield logger


@pytest.fixture(autouse=True)
def _logging_handlers_restored():
    """Remove (and close) the log handlers a test added, such as those of detectron2's
    ``setup_logger`` when ``train_net.py`` runs in-process: they hold the test's captured stdout,
    which pytest closes, so a later test's log records would fail to print ("Logging error")
    into that test's captured stderr. pytest's own capturing handlers are left to pytest."""
    before = {id(logger): set(logger.handlers) for logger in _loggers()}
    yield
    for logger in _loggers():
        for handler in set(logger.handlers) - before.get(id(logger), set()):
            if type(handler).__module__.startswith("_pytest"):
                continue
            logger.removeHandler(handler)
            handler.close()
