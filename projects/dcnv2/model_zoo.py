"""Config files shipped with the package (the repository's ``configs/`` folder)."""

import difflib
import glob
import os

from .errors import ConfigFileNotFoundError

__all__ = ["get_config_file", "list_config_files", "resolve_config_file"]

_CONFIG_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def get_config_file(name: str) -> str:
    """Absolute path of a config shipped with dcnv2 (``name`` relative to ``configs/``)."""
    path = os.path.join(_CONFIG_ROOT, name)
    if not os.path.isfile(path):
        close = difflib.get_close_matches(name, list_config_files(), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ConfigFileNotFoundError(
            f"Config file {name} does not exist (looked at {os.path.abspath(name)}); expected a "
            f"config path or a name in dcnv2.list_config_files(){hint}"
        )
    return path


def list_config_files() -> list:
    """Every shipped config, as paths relative to ``configs/``, sorted."""
    names = glob.glob("**/*.yaml", root_dir=_CONFIG_ROOT, recursive=True)
    names += glob.glob("**/*.py", root_dir=_CONFIG_ROOT, recursive=True)
    return sorted(n for n in names if os.path.basename(n) != "__init__.py")


def resolve_config_file(config_file: str) -> str:
    """The path itself when it is a file, else the config shipped with dcnv2 under that name."""
    return config_file if os.path.isfile(config_file) else get_config_file(config_file)
