"""One JIT-compiled C++ extension of dcnv2 (:class:`JitExtension`), built on first use.

Each build directory is per torch version, interpreter and source version (:func:`build_location`);
a failed build is one warning, and the caller falls back.
"""

import hashlib
import logging
import os
import re
import sys
import threading
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["JitExtension", "build_location"]

_INCLUDE = re.compile(rb'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)
# at::parallel_for is OpenMP in torch's CPU builds: without -fopenmp it runs serially.
_CFLAGS = ["-O3", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]


def _source_files(sources: Sequence[str]) -> List[str]:
    """``sources`` and every local file they ``#include "..."``, transitively, in a fixed order."""
    seen, todo = [], [os.path.abspath(s) for s in sources]
    while todo:
        path = todo.pop(0)
        if path in seen:
            continue
        seen.append(path)
        with open(path, "rb") as f:
            for name in _INCLUDE.findall(f.read()):
                included = os.path.join(os.path.dirname(path), name.decode())
                if os.path.isfile(included):
                    todo.append(os.path.abspath(included))
    return seen


def build_location(
    name: str, sources: Sequence[str], root: Optional[str] = None
) -> Tuple[str, str]:
    """Where this interpreter builds extension ``name`` from ``sources`` (local headers included).

    Returns:
        (module name, build directory): ``<name>_<hash(sources)>`` and
        ``<root>/dcnv2-<python>-<torch>-<hash(sys.prefix)>-<hash(sources)>/<name>``.
    """
    from torch.utils.cpp_extension import get_default_build_root

    content = hashlib.sha256(" ".join(_CFLAGS + _LDFLAGS).encode())
    for path in _source_files(sources):
        with open(path, "rb") as f:
            content.update(os.path.basename(path).encode() + b"\0" + f.read() + b"\0")
    sources_hash = content.hexdigest()[:12]
    root = root or os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    python = f"py{sys.version_info[0]}{sys.version_info[1]}"
    prefix_hash = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    env = f"dcnv2-{python}-{torch.__version__}-{prefix_hash}-{sources_hash}"
    return f"{name}_{sources_hash}", os.path.join(root, env, name)


class JitExtension:
    """A C++ extension that registers operators in ``torch.ops``, compiled at most once.

    Args:
        probe (str): ``"namespace.op"``; the build counts as loaded only when that op resolves.
        what (str): what the extension holds, for the warning ("mdpool kernels").
        fallback (str): what is used instead when the build fails, for the warning.
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
        self._tried = self._warned = False
        self._error: Optional[str] = None

    def _build(self) -> Optional[str]:
        """Compiles and loads the library; returns why that failed, or None."""
        try:
            from torch.utils.cpp_extension import load

            module, directory = build_location(self.name, self.sources)
            os.makedirs(directory, exist_ok=True)
            load(
                name=module,
                sources=self.sources,
                extra_cflags=list(_CFLAGS),  # copies: torch extends the lists it is given
                extra_ldflags=list(_LDFLAGS),
                build_directory=directory,
                is_python_module=False,
                verbose=False,
            )
            namespace, op = self.probe.split(".")
            getattr(getattr(torch.ops, namespace), op)  # raises if the library did not register
        except Exception as e:  # any build or load failure: the caller's fallback still works
            return f"{type(e).__name__}: {e}"
        return None

    def error(self) -> Optional[str]:
        """Why the build failed (``"ExceptionType: message"``), or None; builds on first call."""
        with self._lock:
            if not self._tried:
                self._error, self._tried = self._build(), True
            return self._error

    def is_available(self, warn: bool = True) -> bool:
        """Whether the extension loads (building it on the first call); warns once on failure."""
        error = self.error()
        if error is not None and warn:
            with self._lock:
                first, self._warned = not self._warned, True
            if first:
                self.logger.warning(
                    "dcnv2: could not build the compiled %s (%s); using the slower %s instead",
                    self.what,
                    error,
                    self.fallback,
                )
        return error is None
