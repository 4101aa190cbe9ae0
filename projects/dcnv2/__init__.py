"""dcnv2: Deformable ConvNets v2 for detectron2.

``import dcnv2`` registers the backbones (``build_dcnv2_resnet_backbone``,
``build_dcnv2_resnet_fpn_backbone``) and the synthetic datasets in detectron2's registries.

Without detectron2, the import raises :class:`dcnv2.errors.DependencyMissingError` (an
``ImportError``) saying how to install it.
"""

from .errors import detectron2_missing

try:
    import detectron2  # noqa: F401
except ImportError as e:
    raise detectron2_missing(e) from None

from . import data  # noqa: F401  (registers the synthetic datasets)
from . import modeling  # noqa: F401  (registers the backbones)
from .config import add_dcnv2_config, get_cfg
from .model_zoo import get_config_file, list_config_files

__version__ = "0.1.0"
__all__ = ["add_dcnv2_config", "get_cfg", "get_config_file", "list_config_files"]
