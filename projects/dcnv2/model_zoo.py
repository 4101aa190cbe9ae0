"""Config files shipped with the package (the repository's ``configs/`` folder)."""

import difflib
import os

__all__ = ["get_config_file", "list_config_files", "resolve_config_file"]

_CONFIG_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def get_config_file(name: str) -> str:
    """Absolute path of a config shipped with dcnv2 (``name`` relative to ``configs/``)."""
    path = os.path.join(_CONFIG_ROOT, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"dcnv2 has no config {name!r} (looked for {path}); available: "
            f"{', '.join(list_config_files())}"
        )
    return path


def list_config_files() -> list:
    """Every shipped config, as paths relative to ``configs/``, sorted."""
    names = []
    for root, _, files in os.walk(_CONFIG_ROOT, followlinks=True):
        for f in files:
            if f.endswith((".yaml", ".py")) and f != "__init__.py":
                names.append(os.path.relpath(os.path.join(root, f), _CONFIG_ROOT))
    return sorted(names)


def resolve_config_file(config_file: str) -> str:
    """The path itself when it is a file, else the config shipped with dcnv2 under that name."""
    from .errors import ConfigFileNotFoundError

    if os.path.isfile(config_file):
        return config_file
    path = os.path.join(_CONFIG_ROOT, config_file)
    if os.path.isfile(path):
        return path
    close = difflib.get_close_matches(config_file, list_config_files(), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ConfigFileNotFoundError(
        f"Config file {config_file} does not exist (looked at "
        f"{os.path.abspath(config_file)}); expected a config path, or the name "
        f"of a config shipped with dcnv2 (dcnv2.list_config_files()){hint}"
    )
