"""The messages torch, fvcore and detectron2 print on every run that a dcnv2 user can do nothing
about, and :func:`known_messages_silenced`, which drops exactly those (matched by text and
category or logger) around the imports and calls of dcnv2 that cause them; nothing else is
filtered, and the filters are restored on exit.

Where each comes from (torch 2.14, detectron2 0.7, fvcore 0.1.5):

* ``torch.jit.script is deprecated`` (FutureWarning): ``@torch.jit.script`` functions defined at
  import by ``fvcore.nn.focal_loss`` and ``detectron2.modeling.box_regression``
  (:mod:`dcnv2.imports` runs those two imports in the context).
* ``No CUDA runtime is found, using CUDA_HOME=...`` (a warning of the logger
  ``torch.utils.cpp_extension``): importing that module on a machine with CUDA tools but no
  GPU, which dcnv2's C++ backend does to build itself (:mod:`dcnv2.layers.native_cpp`).
* ``torch.meshgrid: in an upcoming release, it will be required to pass the indexing argument``
  (UserWarning): detectron2's anchor generator, in every forward pass of a model with anchors.
* ``is_fx_tracing will return true for both fx.symbolic_trace and torch.export`` (a warning of
  the logger ``torch.fx._symbolic_trace``): detectron2's ``ROIPooler.forward``.

The last two come from model forward passes: train_net.py's runs, the tools' predictions and
the mdpool and mimicking benchmarks run in the context.

This module imports nothing heavy (no torch), so that any entry point can use it first.
"""

import contextlib
import logging
import re
import warnings
from typing import Iterator, Tuple, Type

__all__ = ["KNOWN_LOG_MESSAGES", "KNOWN_WARNINGS", "known_messages_silenced"]

# (message regex, warning category): matched at the start of the message, as warnings does.
KNOWN_WARNINGS: Tuple[Tuple[str, Type[Warning]], ...] = (
    (r"`torch\.jit\.script` is deprecated", FutureWarning),
    (
        r"torch\.meshgrid: in an upcoming release, it will be required to pass the indexing",
        UserWarning,
    ),
)
# (logger name, message regex matched at the start of the record's format string).
KNOWN_LOG_MESSAGES: Tuple[Tuple[str, str], ...] = (
    ("torch.utils.cpp_extension", r"No CUDA runtime is found, using CUDA_HOME"),
    ("torch.fx._symbolic_trace", r"is_fx_tracing will return true for both"),
)


class _DropMessage(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self._pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return self._pattern.match(str(record.msg)) is None


@contextlib.contextmanager
def known_messages_silenced() -> Iterator[None]:
    """Within the block, drop the known warnings (:data:`KNOWN_WARNINGS`) and log messages
    (:data:`KNOWN_LOG_MESSAGES`); every other warning and log record is untouched. Restores the
    warning filters and removes the log filters on exit (not thread-safe, as
    ``warnings.catch_warnings``)."""
    filters = [(logging.getLogger(name), _DropMessage(p)) for name, p in KNOWN_LOG_MESSAGES]
    with warnings.catch_warnings():
        for pattern, category in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=category)
        for logger, log_filter in filters:
            logger.addFilter(log_filter)
        try:
            yield
        finally:
            for logger, log_filter in filters:
                logger.removeFilter(log_filter)
