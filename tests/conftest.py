"""Test-suite hygiene shared by every test folder."""

import logging

import pytest


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
