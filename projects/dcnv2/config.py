"""dcnv2's config keys, and the reading of a run's config: YAML (``CfgNode``) or LazyConfig.

:func:`cfg_get` reads a dotted key of either dialect; :class:`RunKeys` names a run's keys in each;
:func:`check_solver` rejects unusable numeric settings before anything is written.
"""

import contextlib
import difflib
import inspect
import math
import re
from collections import namedtuple
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import LazyConfig
from detectron2.config import get_cfg as d2_get_cfg
from detectron2.utils.registry import locate
from omegaconf import OmegaConf

from .errors import ConfigError, ConfigFileNotFoundError
from .model_zoo import resolve_config_file

__all__ = [
    "LAZY_KEYS",
    "YAML_KEYS",
    "RunKeys",
    "add_dcnv2_config",
    "cfg_get",
    "check_solver",
    "datasets_used",
    "get_cfg",
    "is_lazy_config",
    "load_config",
    "run_keys",
]


def add_dcnv2_config(cfg: CN) -> CN:
    """Add the dcnv2 keys, with defaults that reproduce the seed recipe, to ``cfg`` (in place)."""
    cfg.MODEL.DCNV2 = CN()
    # Deformable-conv implementation: "auto", "detectron2", "native" or "torchvision".
    cfg.MODEL.DCNV2.BACKEND = "auto"
    # Unpickle any object when loading weights (dcnv2.checkpoint): only for trusted files.
    cfg.MODEL.DCNV2.ALLOW_UNSAFE_WEIGHTS = False
    # Skip tensors whose shapes differ from the model's (detectron2's behaviour); False: an error.
    cfg.MODEL.DCNV2.ALLOW_SHAPE_MISMATCH = False
    # LR factor of the offset/mask convs (*conv2_offset*); the DCNv2 paper's recipe uses 0.1.
    cfg.MODEL.DCNV2.OFFSET_LR_MULTIPLIER = 1.0
    # R-CNN feature mimicking (paper 3.3), with MimicROIHeads and MimicGeneralizedRCNN.
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
    # mdpool for POOLER_TYPE "ModulatedDeformROIAlign"; defaults are mmcv's.
    cfg.MODEL.DCNV2.MDPOOL = CN()
    # Scale of the predicted bin offsets, in units of the RoI's width and height.
    cfg.MODEL.DCNV2.MDPOOL.GAMMA = 0.1
    # Width of the hidden fc layers of the offset and modulation branches.
    cfg.MODEL.DCNV2.MDPOOL.FC_DIM = 1024
    # Hidden fc layers of the offset branch.
    cfg.MODEL.DCNV2.MDPOOL.NUM_OFFSET_FC = 2
    # Hidden fc layers of the modulation branch.
    cfg.MODEL.DCNV2.MDPOOL.NUM_MASK_FC = 1
    # One set of branch parameters for all FPN levels (True) or one per level (MMDetection).
    cfg.MODEL.DCNV2.MDPOOL.SHARE_ACROSS_LEVELS = False
    # Reliability options (dcnv2.data.validation, dcnv2.engine.hooks).
    cfg.DATASETS.DCNV2 = CN()
    # Bad annotation entries in a training set: "fail" or "skip" (warn, drop them).
    cfg.DATASETS.DCNV2.ON_BAD_DATA = "fail"
    # User COCO datasets: (("my_train", "train.json", "images/"), ...).
    cfg.DATASETS.DCNV2.COCO = ()
    cfg.INPUT.DCNV2 = CN()
    # Image resizing: "pil" (detectron2) or "opencv" (MMDetection's keep-ratio Resize).
    cfg.INPUT.DCNV2.RESIZE_BACKEND = "pil"
    cfg.SOLVER.DCNV2 = CN()
    # Iterations with a non-finite loss to skip (no update) before stopping; 0: stop at the first.
    cfg.SOLVER.DCNV2.MAX_NONFINITE_SKIPS = 0
    return cfg


def get_cfg(config_file: Optional[str] = None, opts: Sequence[str] = ()) -> CN:
    """detectron2's default config with the dcnv2 keys, merged with a YAML ``config_file`` (a
    path or a name under ``configs/``) and ``["KEY", "VALUE", ...]`` overrides."""
    cfg = add_dcnv2_config(d2_get_cfg())
    if config_file:
        config_file = resolve_config_file(config_file)
        with config_errors(cfg, f"config file {config_file}"):
            cfg.merge_from_file(config_file)
    with config_errors(cfg, "the command line"):
        cfg.merge_from_list(list(opts))
    return cfg


def is_lazy_config(config_file: str) -> bool:
    """True for a LazyConfig (Python) file, False for a YAML config."""
    return config_file.endswith(".py")


def load_config(config_file: str, opts: Sequence[str] = ()):
    """Load a LazyConfig file (a path or a name under ``configs/``), apply ``key=value`` opts."""
    if not is_lazy_config(config_file):
        raise ConfigError(f"{config_file!r} is not a LazyConfig file: expected a .py file")
    cfg = LazyConfig.load(resolve_config_file(config_file))
    return LazyConfig.apply_overrides(cfg, check_override_keys(cfg, opts))


def _did_you_mean(key: str, valid: Sequence[str]) -> str:
    """``"; did you mean K?"`` for the valid key K closest to a mistyped ``key``, or ``""``."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not close:  # the right name under the wrong node: match the last part alone
        by_leaf = {}
        for k in sorted(valid):
            by_leaf.setdefault(k.rsplit(".", 1)[-1], k)
        leaf = key.rsplit(".", 1)[-1]
        close = [by_leaf[n] for n in difflib.get_close_matches(leaf, list(by_leaf), 1, 0.75)]
    return f"; did you mean {close[0]}?" if close else ""


def _all_keys(node, prefix: str = "") -> List[str]:
    """Every dotted key of a ``CfgNode`` or LazyConfig, nodes and leaves."""
    keys = []
    for k in node.keys():
        keys.append(f"{prefix}{k}")
        try:
            value = node[k]
        except Exception:  # a LazyConfig interpolation that does not resolve yet
            continue
        if isinstance(value, dict) or OmegaConf.is_dict(value):
            keys += _all_keys(value, f"{prefix}{k}.")
    return keys


# yacs keeps "nan"/"inf" as strings and reports a type mismatch.
_NON_FINITE = re.compile(
    r"'float'> vs\. <class 'str'>\) with values \((.*) vs\. ([-+]?(?:nan|inf|infinity))\) "
    r"for config key: (\S+)",
    re.IGNORECASE,
)


@contextlib.contextmanager
def config_errors(cfg, source: str) -> Iterator[None]:
    """Turn yacs's merge errors into :class:`ConfigError` naming ``source`` and close keys."""
    title = source[0].upper() + source[1:]
    try:
        yield
    except yaml.YAMLError as e:
        raise ConfigError(f"{title} is not valid YAML: {e}") from None
    except FileNotFoundError as e:  # a _BASE_ file
        raise ConfigFileNotFoundError(
            f"{title} names a file that does not exist: {e.filename} (paths in _BASE_ are "
            "relative to the file that names them)"
        ) from None
    except (KeyError, AssertionError) as e:
        # yacs raises KeyError from a file, AssertionError from a list of overrides.
        msg = str(e.args[0]) if e.args else ""
        found = re.search(r"Non-existent (?:config )?key: (\S+)", msg)
        if found:
            key = found.group(1)
            hint = _did_you_mean(key, _all_keys(cfg))
            raise ConfigError(f"Unknown config key {key} in {source}{hint}") from None
        if isinstance(e, AssertionError):
            raise ConfigError(
                f"Bad overrides on {source}: {msg}. Expected KEY VALUE pairs, e.g. "
                "SOLVER.BASE_LR 0.01"
            ) from None
        raise ConfigError(f"Config key problem in {source}: {msg}") from None
    except ValueError as e:  # yacs: "Type mismatch (...) with values (...) for config key: K"
        found = _NON_FINITE.search(str(e))
        if found:
            default, value, key = found.groups()
            raise ConfigError(
                f"{key}: {value!r} is not a finite number; expected a float like {default}"
            ) from None
        raise ConfigError(f"Bad config value in {source}: {e}") from None


# Keys dcnv2 reads from a LazyConfig when they are set, which the shipped configs may leave out.
OPTIONAL_KEYS = (
    "train.seed",
    "train.max_nonfinite_skips",
    "train.allow_unsafe_weights",
    "dataloader.coco_datasets",
)


def _target_accepts(target: Any, name: str) -> bool:
    # Whether the callable of a LazyCall node takes an argument ``name`` it leaves at its default;
    # True when that cannot be told (instantiate reports an unimportable target itself).
    try:
        params = inspect.signature(locate(target) if isinstance(target, str) else target).parameters
    except Exception:
        return True
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params.values())


def _known(cfg, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    if not OmegaConf.is_config(node):
        return False
    if OmegaConf.is_list(node):
        return leaf.isdigit() and int(leaf) < len(node)
    if leaf in node:
        return True
    target = node.get("_target_", None)
    return target is not None and _target_accepts(target, leaf)


def check_override_keys(cfg, opts: Sequence[str], source: str = "the command line") -> List[str]:
    """The ``key=value`` overrides to apply (``+key`` adds a key, as in Hydra); refuse keys that
    are not the config's, an argument of the ``LazyCall`` callable above, or OPTIONAL_KEYS."""
    out = []
    for opt in opts:
        key, sep, value = opt.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"Bad override {opt!r} on {source}: expected key=value, like train.max_iter=10"
            )
        if key.startswith("+"):
            out.append(f"{key[1:]}={value}")
        elif key in OPTIONAL_KEYS or _known(cfg, key):
            out.append(opt)
        else:
            hint = _did_you_mean(key, _all_keys(cfg) + list(OPTIONAL_KEYS))
            raise ConfigError(
                f"Unknown config key {key} in {opt!r} on {source}{hint} (+{key}=... adds a new "
                "key on purpose)"
            )
    return out


def cfg_get(cfg, key: Optional[str], default: Any = None) -> Any:
    """The value of the dotted ``key`` in a ``CfgNode`` or LazyConfig, or ``default`` if absent."""
    if key is None:
        return default
    node = cfg
    for part in key.split("."):
        node = node.get(part, None) if node is not None else None
        if node is None:
            return default
    return node


# Where each of a run's settings is set, read with cfg_get: (YAML key, LazyConfig key); None: the
# dialect has no such key. lr and clip name where those are set, for messages.
_RUN_KEYS = {
    "device": ("MODEL.DEVICE", "train.device"),
    "output_dir": ("OUTPUT_DIR", "train.output_dir"),
    "weights": ("MODEL.WEIGHTS", "train.init_checkpoint"),
    "seed": ("SEED", "train.seed"),
    "checkpoint_period": ("SOLVER.CHECKPOINT_PERIOD", "train.checkpointer.period"),
    "cudnn_benchmark": ("CUDNN_BENCHMARK", "train.cudnn_benchmark"),
    "max_nonfinite_skips": ("SOLVER.DCNV2.MAX_NONFINITE_SKIPS", "train.max_nonfinite_skips"),
    "allow_unsafe_weights": ("MODEL.DCNV2.ALLOW_UNSAFE_WEIGHTS", "train.allow_unsafe_weights"),
    "allow_shape_mismatch": ("MODEL.DCNV2.ALLOW_SHAPE_MISMATCH", None),
    "on_bad_data": ("DATASETS.DCNV2.ON_BAD_DATA", "train.on_bad_data"),
    "lr": ("SOLVER.BASE_LR, SOLVER.WARMUP_ITERS", "optimizer.lr, lr_multiplier's warmup"),
    "clip": ("SOLVER.CLIP_GRADIENTS", "detectron2.solver.build.maybe_add_gradient_clipping"),
    "coco_datasets": ("DATASETS.DCNV2.COCO", "dataloader.coco_datasets"),
}
# The keys of one dialect, as attributes: YAML_KEYS.device == "MODEL.DEVICE".
RunKeys = namedtuple("RunKeys", list(_RUN_KEYS))
YAML_KEYS = RunKeys(*(yaml_key for yaml_key, _ in _RUN_KEYS.values()))
LAZY_KEYS = RunKeys(*(lazy_key for _, lazy_key in _RUN_KEYS.values()))


def run_keys(cfg) -> RunKeys:
    """:data:`YAML_KEYS` for a ``CfgNode``, :data:`LAZY_KEYS` for a LazyConfig."""
    return YAML_KEYS if isinstance(cfg, CN) else LAZY_KEYS


def datasets_used(cfg) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """The (train, test) registered dataset names a run of ``cfg`` reads."""
    if isinstance(cfg, CN):
        return tuple(cfg.DATASETS.TRAIN), tuple(cfg.DATASETS.TEST)
    names = [cfg_get(cfg, f"dataloader.{split}.dataset.names", ()) for split in ("train", "test")]
    return tuple((n,) if isinstance(n, str) else tuple(n) for n in names)


_ITERS = "at least 1 iteration"
_DECAY = "a finite number >= 0, like 0.0001"
# (YAML key, LazyConfig key, what is expected, lowest value, whole number) of each number
# check_solver checks; None: the dialect has no such key.
_NUMBERS = (
    ("SOLVER.MAX_ITER", "train.max_iter", _ITERS, 1, True),
    ("SOLVER.BASE_LR", "optimizer.lr", "a finite learning rate >= 0, like 0.02", 0, False),
    ("SOLVER.WEIGHT_DECAY", "optimizer.weight_decay", _DECAY, 0, False),
    ("SOLVER.WEIGHT_DECAY_NORM", None, _DECAY, 0, False),
    ("SOLVER.WEIGHT_DECAY_BIAS", None, _DECAY, 0, False),
    ("SOLVER.MOMENTUM", None, _DECAY, 0, False),
    ("SOLVER.IMS_PER_BATCH", "dataloader.train.total_batch_size", "at least 1 image", 1, True),
    ("SOLVER.CHECKPOINT_PERIOD", "train.checkpointer.period", _ITERS, 1, True),
    ("SOLVER.WARMUP_ITERS", None, "0 or more iterations", 0, True),
    ("SOLVER.WARMUP_FACTOR", None, "a finite factor >= 0, like 0.001", 0, False),
    (None, "lr_multiplier.warmup_length", "a fraction of the run, 0 to 1", 0, False),
)


def _check_steps(steps, key: str, max_iter: Optional[int] = None) -> None:
    steps = list(steps or ())
    if not all(a < b for a, b in zip([0] + steps, steps)):
        raise ConfigError(f"{key} is {tuple(steps)}; expected increasing positive iterations")
    if max_iter in steps:  # fvcore's scheduler refuses it; steps after the run are ignored
        raise ConfigError(
            f"{key} is {tuple(steps)}, a step at the run's last iteration (SOLVER.MAX_ITER "
            f"{max_iter}); expected steps below {max_iter}"
        )


def check_solver(cfg) -> None:
    """Raise ConfigError naming the first numeric setting a run cannot work with."""
    is_yaml = isinstance(cfg, CN)
    for yaml_key, lazy_key, expected, low, integer in _NUMBERS:
        key = yaml_key if is_yaml else lazy_key
        value = cfg_get(cfg, key)
        if value is None or isinstance(value, str):
            continue  # absent, or not a plain number (checked where it is used)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (ok and math.isfinite(value) and value >= low and (not integer or value % 1 == 0)):
            raise ConfigError(f"{key} is {value!r}; expected {expected}")
    if is_yaml:
        max_iter, warmup = cfg.SOLVER.MAX_ITER, cfg.SOLVER.WARMUP_ITERS
        if warmup > max_iter:
            raise ConfigError(
                f"SOLVER.WARMUP_ITERS {warmup} is longer than the run (SOLVER.MAX_ITER "
                f"{max_iter}); expected at most {max_iter}"
            )
        if cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupMultiStepLR":
            _check_steps(cfg.SOLVER.STEPS, "SOLVER.STEPS", max_iter)
        return
    warmup = cfg_get(cfg, "lr_multiplier.warmup_length")
    if isinstance(warmup, (int, float)) and warmup > 1:
        raise ConfigError(
            f"lr_multiplier.warmup_length is {warmup!r}: longer than the run; expected a "
            "fraction of the run from 0 to 1, like 0.01"
        )
    milestones = cfg_get(cfg, "lr_multiplier.scheduler.milestones")
    if milestones is not None:
        _check_steps(milestones, "lr_multiplier.scheduler.milestones")
