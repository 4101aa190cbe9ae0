"""Deformable ConvNets v2 for detectron2.

``import dcnv2`` registers its backbones, ROI heads and synthetic datasets in detectron2's
registries. Without detectron2 it raises :class:`dcnv2.errors.DependencyMissingError` (an
``ImportError``) saying how to install it.
"""

import warnings

from .errors import detectron2_missing

try:
    import detectron2  # noqa: F401
except ImportError as e:
    raise detectron2_missing(e) from None

with warnings.catch_warnings():
    # fvcore.nn.focal_loss and detectron2.modeling.box_regression, imported here, define
    # @torch.jit.script functions: torch's deprecation of that is not for dcnv2's users.
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
    from . import data, modeling  # noqa: F401  (registers the components)
    from .config import add_dcnv2_config, get_cfg
    from .model_zoo import get_config_file, list_config_files

__version__ = "0.1.0"
__all__ = ["add_dcnv2_config", "get_cfg", "get_config_file", "list_config_files"]
