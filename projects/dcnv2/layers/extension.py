"""One JIT-compiled C++ extension of dcnv2 (:class:`JitExtension`): built on first use with
:func:`torch.utils.cpp_extension.load`, the build's outcome kept for the process, and one warning
naming what falls back when it fails.

torch caches the build under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), so
later processes load it at once. Used by :mod:`dcnv2.layers.native_cpp` and
:mod:`dcnv2.layers.mdpool_cpp`.
"""

import logging
import threading
from typing import List, Optional, Sequence

import torch

__all__ = ["JitExtension"]


class JitExtension:
    """A C++ extension that registers operators in ``torch.ops``, compiled at most once.

    Args:
        name (str): the extension's name for torch's build cache (``dcnv2_native_cpu``).
        sources (Sequence[str]): paths of its C++ files.
        probe (str): ``"namespace.op"``, an operator the library registers; the build counts as
            loaded only when ``torch.ops.namespace.op`` resolves.
        what (str): what the extension holds, for the warning ("mdpool kernels").
        fallback (str): what is used instead when the build fails, for the warning
            ("PyTorch-op implementation").
        logger (logging.Logger): where the warning goes (the using module's logger).
    """

    def __init__(
        self,
        name: str,
        sources: Sequence[str],
        probe: str,
        what: str,
        fallback: str,
        logger: logging.Logger,
    ):
        namespace, sep, op = probe.partition(".")
        if not sep or not namespace or not op or "." in op:
            raise ValueError(f"probe must be 'namespace.op', got {probe!r}")
        self.name = name
        self.sources: List[str] = list(sources)
        self.probe = probe
        self.what = what
        self.fallback = fallback
        self.logger = logger
        self._lock = threading.Lock()
        self._loaded: Optional[bool] = None
        self._error: Optional[str] = None
        self._warned = False

    def _build(self) -> Optional[str]:
        """Compiles and loads the library; returns why that failed, or None."""
        try:
            from torch.utils.cpp_extension import load

            # at::parallel_for is OpenMP in torch's CPU builds: without -fopenmp it runs serially.
            load(
                name=self.name,
                sources=self.sources,
                extra_cflags=["-O3", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
            namespace, op = self.probe.split(".")
            getattr(getattr(torch.ops, namespace), op)  # raises if the library did not register
        except Exception as e:  # any build or load failure: the caller's fallback still works
            return f"{type(e).__name__}: {e}"
        return None

    def _load(self) -> bool:
        with self._lock:
            if self._loaded is None:
                self._error = self._build()
                self._loaded = self._error is None
            return self._loaded

    def is_available(self, warn: bool = True) -> bool:
        """Whether the extension loads (building it on the first call); with ``warn``, a failed
        build is logged once per extension, with the reason."""
        ok = self._load()
        if not ok and warn:
            with self._lock:
                first, self._warned = not self._warned, True
            if first:
                self.logger.warning(
                    "dcnv2: could not build the compiled %s (%s); using the slower %s instead",
                    self.what,
                    self._error,
                    self.fallback,
                )
        return ok

    def error(self) -> Optional[str]:
        """Why the build failed (``"ExceptionType: message"``), or None."""
        self._load()
        return self._error
