"""Config files shipped with the package (the repository's ``configs/`` folder)."""

import os

__all__ = ["get_config_file", "list_config_files"]

_CONFIG_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def get_config_file(name: str) -> str:
    """Absolute path of a config shipped with dcnv2.

    Args:
        name: path relative to ``configs/``, e.g. ``"faster_rcnn_R50_mdconv_FPN_1x.yaml"``.
    """
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
