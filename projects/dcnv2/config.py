"""The project's config keys: ``add_dcnv2_config(cfg)`` adds them, under ``MODEL.DCNV2`` (and
``DATASETS.DCNV2``, ``SOLVER.DCNV2`` for the reliability options).

Which stages are deformable and how is said with detectron2's own keys:
``MODEL.RESNETS.DEFORM_ON_PER_STAGE``, ``DEFORM_MODULATED`` (True: DCNv2) and
``DEFORM_NUM_GROUPS``.
"""

import contextlib
import difflib
import re
from typing import Iterable, Iterator, List, Optional, Sequence

import yaml
from detectron2.config import CfgNode as CN

from .errors import ConfigError, ConfigFileNotFoundError

__all__ = ["add_dcnv2_config", "closest_keys", "config_errors", "get_cfg"]


def add_dcnv2_config(cfg: CN) -> CN:
    """Add the dcnv2 keys, with defaults that reproduce the seed recipe, to ``cfg`` (in place)."""
    cfg.MODEL.DCNV2 = CN()
    # Deformable-conv implementation: "auto" (best for the device), "detectron2", "native"
    # or "torchvision". See dcnv2.layers.backends.
    cfg.MODEL.DCNV2.BACKEND = "auto"
    # Unpickle any object when loading weights (dcnv2.checkpoint): only for trusted files.
    cfg.MODEL.DCNV2.ALLOW_UNSAFE_WEIGHTS = False
    # Load weights whose tensors' shapes differ from the model's by skipping those tensors
    # (detectron2's behaviour, e.g. to fine-tune on other classes); False: a clear error.
    cfg.MODEL.DCNV2.ALLOW_SHAPE_MISMATCH = False
    # Model family options (dcnv2.engine.solver). Learning-rate factor of the convs that predict the
    # offsets and masks (parameters named "*conv2_offset*"). 1.0 is what detectron2 and
    # MMDetection (paramwise_cfg dcn_offset_lr_mult) use by default and what every shipped recipe
    # uses; 0.1 is the lower rate of the DCNv2 paper's recipe for these layers.
    cfg.MODEL.DCNV2.OFFSET_LR_MULTIPLIER = 1.0
    # R-CNN feature mimicking (paper section 3.3; dcnv2.modeling.mimic), training only. Needs
    # ROI_HEADS.NAME "MimicROIHeads" and META_ARCHITECTURE "MimicGeneralizedRCNN".
    cfg.MODEL.DCNV2.MIMIC = CN()
    # Add the R-CNN branch and its two losses.
    cfg.MODEL.DCNV2.MIMIC.ENABLED = False
    # Positive RoIs cropped per image (paper: 32).
    cfg.MODEL.DCNV2.MIMIC.NUM_POSITIVES_PER_IMAGE = 32
    # Side of the resized crops, a multiple of the backbone's size_divisibility (paper: 224).
    cfg.MODEL.DCNV2.MIMIC.CROP_SIZE = 224
    # Weight of the 1 - cos feature-mimic loss (paper: 0.1).
    cfg.MODEL.DCNV2.MIMIC.LOSS_WEIGHT = 0.1
    # Weight of the R-CNN branch's classification loss.
    cfg.MODEL.DCNV2.MIMIC.CLS_LOSS_WEIGHT = 0.1
    # R-CNN branch uses the box head's fcs (True) or its own copy of them (False).
    cfg.MODEL.DCNV2.MIMIC.SHARE_HEAD_FCS = True
    # Treat the R-CNN features as the target: no mimic gradient through the R-CNN branch.
    cfg.MODEL.DCNV2.MIMIC.DETACH_RCNN_FEATURES = True
    # Modulated deformable RoI pooling (mdpool; dcnv2.modeling.poolers), used by a head whose
    # POOLER_TYPE is "ModulatedDeformROIAlign" under ROI_HEADS.NAME "DCNv2StandardROIHeads" or
    # "DCNv2CascadeROIHeads". Defaults are mmcv's ModulatedDeformRoIPoolPack.
    cfg.MODEL.DCNV2.MDPOOL = CN()
    # Scale of the predicted bin offsets, in units of the RoI's width and height.
    cfg.MODEL.DCNV2.MDPOOL.GAMMA = 0.1
    # Width of the hidden fc layers of the offset and modulation branches.
    cfg.MODEL.DCNV2.MDPOOL.FC_DIM = 1024
    # Hidden fc layers of the offset branch.
    cfg.MODEL.DCNV2.MDPOOL.NUM_OFFSET_FC = 2
    # Hidden fc layers of the modulation branch.
    cfg.MODEL.DCNV2.MDPOOL.NUM_MASK_FC = 1
    # One set of branch parameters for all FPN levels (True) or one per level (False, as
    # MMDetection, whose SingleRoIExtractor builds one ModulatedDeformRoIPoolPack per level).
    cfg.MODEL.DCNV2.MDPOOL.SHARE_ACROSS_LEVELS = False
    # Reliability options (dcnv2.data.validation, dcnv2.engine.hooks).
    cfg.DATASETS.DCNV2 = CN()
    # Bad annotation entries or unreadable images in a training set: "fail" (stop, listing
    # them) or "skip" (warn and train without them).
    cfg.DATASETS.DCNV2.ON_BAD_DATA = "fail"
    # The user's COCO-format datasets, registered by name before the run reads DATASETS.TRAIN
    # and TEST (dcnv2.data.coco): (("my_train", "train.json", "images/"), ...).
    cfg.DATASETS.DCNV2.COCO = ()
    cfg.INPUT.DCNV2 = CN()
    # How images are resized (dcnv2.data.transforms): "pil", detectron2's ResizeShortestEdge; or
    # "opencv", MMDetection's keep-ratio Resize (cv2.resize, mmcv's size rounding), bit for bit.
    cfg.INPUT.DCNV2.RESIZE_BACKEND = "pil"
    cfg.SOLVER.DCNV2 = CN()
    # Iterations with a non-finite loss to skip (no update) before stopping; 0: stop at the first.
    cfg.SOLVER.DCNV2.MAX_NONFINITE_SKIPS = 0
    return cfg


def get_cfg(config_file: Optional[str] = None, opts: Sequence[str] = ()) -> CN:
    """detectron2's default config with the dcnv2 keys, merged with a YAML file and overrides.

    Args:
        config_file: a YAML config (a path, or a name under ``configs/`` of the package).
        opts: ``["KEY", "VALUE", ...]`` overrides, as on the command line.
    """
    from detectron2.config import get_cfg as d2_get_cfg

    from .model_zoo import resolve_config_file

    cfg = add_dcnv2_config(d2_get_cfg())
    if config_file:
        config_file = resolve_config_file(config_file)
        with config_errors(cfg, f"config file {config_file}"):
            cfg.merge_from_file(config_file)
    with config_errors(cfg, "the command line"):
        cfg.merge_from_list(list(opts))
    return cfg


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
