"""Errors caused by what the user gave (files, config, command line), not by a bug.

``train_net.py`` prints each as one ``error: ...`` line, without a traceback. Every message says
what is wrong, which file or key, and what was expected. The classes also derive from the
built-in exception a caller would catch without dcnv2 (``FileNotFoundError``, ``KeyError``...).
"""

import contextlib
import difflib
import re
from typing import Iterable, Iterator, List

import yaml

__all__ = [
    "AnnotationError",
    "ConfigError",
    "ConfigFileNotFoundError",
    "DCNv2Error",
    "ImageReadError",
    "LaunchError",
    "NonFiniteLossError",
    "OutputDirError",
    "WeightsError",
    "closest_keys",
    "config_errors",
]


class DCNv2Error(Exception):
    """Base class: a problem with the user's input, reported as one message."""

    def __str__(self) -> str:
        # KeyError's str() is the repr of its argument; keep the message readable.
        return str(self.args[0]) if self.args else ""


class ConfigError(DCNv2Error, ValueError):
    """A config with an unknown key or a value of the wrong type."""


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """A config file (or a file its ``_BASE_`` names) that does not exist."""


class WeightsError(DCNv2Error, OSError):
    """A weights/checkpoint file that is missing, unreadable, truncated or does not fit."""


class AnnotationError(DCNv2Error, ValueError):
    """A dataset's annotation file is malformed or inconsistent."""


class ImageReadError(DCNv2Error, OSError):
    """An image of a dataset cannot be read (missing, unreadable, truncated, wrong size)."""


class OutputDirError(DCNv2Error, OSError):
    """``OUTPUT_DIR`` cannot be created or written."""


class LaunchError(DCNv2Error, ValueError):
    """The command line asks for processes or devices this machine does not have."""


class NonFiniteLossError(DCNv2Error, FloatingPointError):
    """A training loss became NaN or infinite; the weights were not updated with it."""


def closest_keys(key: str, valid: Iterable[str], n: int = 3) -> List[str]:
    """The valid config keys closest to a mistyped ``key`` (full dotted names), best first.

    The last component weighs most (``SOLVER.BASE_LRR`` -> ``SOLVER.BASE_LR``), but a key put
    under the wrong node (``MODEL.BASE_LR``) is found too.
    """
    valid = list(valid)
    by_full = difflib.get_close_matches(key, valid, n=n, cutoff=0.6)
    leaf = key.rsplit(".", 1)[-1]
    leaves = {}
    for k in valid:
        leaves.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    by_leaf = [
        full for name in difflib.get_close_matches(leaf, list(leaves), n=n, cutoff=0.75)
        for full in sorted(leaves[name])
    ]  # fmt: skip
    out: List[str] = []
    for k in by_full + by_leaf:
        if k not in out:
            out.append(k)
    return out[:n]


def _all_keys(cfg, prefix: str = "") -> List[str]:
    keys = []
    for k, v in cfg.items():
        if isinstance(v, dict):
            keys += _all_keys(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


@contextlib.contextmanager
def config_errors(cfg, source: str) -> Iterator[None]:
    """Turn yacs's errors while merging into ``cfg`` into :class:`ConfigError` /
    :class:`ConfigFileNotFoundError` naming ``source`` (a file, or "the command line") and, for
    an unknown key, the closest valid ones."""
    try:
        yield
    except yaml.YAMLError as e:
        raise ConfigError(f"{source[0].upper()}{source[1:]} is not valid YAML: {e}") from None
    except FileNotFoundError as e:  # a _BASE_ file
        raise ConfigFileNotFoundError(
            f"{source[0].upper()}{source[1:]} names a file that does not exist: {e.filename} "
            "(paths in _BASE_ are relative to the file that names them)"
        ) from None
    except (KeyError, AssertionError) as e:
        # yacs: KeyError "Non-existent config key: K" from a file, AssertionError "Non-existent
        # key: K" or "Override list has odd length" from a list of overrides.
        msg = str(e.args[0]) if e.args else ""
        found = re.search(r"Non-existent (?:config )?key: (\S+)", msg)
        if found:
            key = found.group(1)
            close = closest_keys(key, _all_keys(cfg), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"Unknown config key {key} in {source}{hint}") from None
        if isinstance(e, AssertionError):
            raise ConfigError(
                f"Bad overrides on {source}: {msg}. Expected KEY VALUE pairs, e.g. "
                "SOLVER.BASE_LR 0.01"
            ) from None
        raise ConfigError(f"Config key problem in {source}: {msg}") from None
    except ValueError as e:  # yacs: "Type mismatch (...) with values (...) for config key: K"
        raise ConfigError(f"Bad config value in {source}: {e}") from None
