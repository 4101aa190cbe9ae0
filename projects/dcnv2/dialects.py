"""The two config dialects a run can be given: a YAML config (detectron2 ``CfgNode``) or a
LazyConfig (``.py`` file, omegaconf ``DictConfig``).

What differs between them for the training machinery is gathered here, read once where the
config is read, and passed on as one :class:`RunKeys`: the key names that messages cite and
that the run's settings are read from, and the datasets a run reads (:func:`datasets_used`).
"""

from dataclasses import dataclass
from typing import Any, Optional, Tuple

from detectron2.config import CfgNode

__all__ = ["LAZY_KEYS", "YAML_KEYS", "RunKeys", "datasets_used", "run_keys"]


@dataclass(frozen=True)
class RunKeys:
    """The config keys of one dialect, as dotted names (``"MODEL.WEIGHTS"``).

    Attributes:
        device, output_dir, weights: the model's device, the output folder, the initial weights.
        checkpoint_period: how often checkpoints are written.
        max_nonfinite_skips: iterations with a non-finite loss to skip before stopping.
        allow_unsafe_weights: unpickle any object when loading weights.
        allow_shape_mismatch: skip tensors that do not fit instead of failing (None: no key).
        on_bad_data: "fail" or "skip" for bad training data (None: no key, always "fail").
        lr, clip: where the learning rate and gradient clipping are set, for messages.
        coco_datasets: the user's COCO datasets to register (:mod:`dcnv2.data.coco`).
    """

    device: str
    output_dir: str
    weights: str
    checkpoint_period: str
    max_nonfinite_skips: str
    allow_unsafe_weights: str
    allow_shape_mismatch: Optional[str]
    on_bad_data: Optional[str]
    lr: str
    clip: str
    coco_datasets: str

    def value(self, cfg, key: Optional[str], default: Any = None) -> Any:
        """The value of the dotted ``key`` in ``cfg``, or ``default`` when a part is absent."""
        if key is None:
            return default
        node = cfg
        for part in key.split("."):
            node = node.get(part, None) if node is not None else None
            if node is None:
                return default
        return node


YAML_KEYS = RunKeys(
    device="MODEL.DEVICE",
    output_dir="OUTPUT_DIR",
    weights="MODEL.WEIGHTS",
    checkpoint_period="SOLVER.CHECKPOINT_PERIOD",
    max_nonfinite_skips="SOLVER.DCNV2.MAX_NONFINITE_SKIPS",
    allow_unsafe_weights="MODEL.DCNV2.ALLOW_UNSAFE_WEIGHTS",
    allow_shape_mismatch="MODEL.DCNV2.ALLOW_SHAPE_MISMATCH",
    on_bad_data="DATASETS.DCNV2.ON_BAD_DATA",
    lr="SOLVER.BASE_LR, SOLVER.WARMUP_ITERS",
    clip="SOLVER.CLIP_GRADIENTS",
    coco_datasets="DATASETS.DCNV2.COCO",
)

LAZY_KEYS = RunKeys(
    device="train.device",
    output_dir="train.output_dir",
    weights="train.init_checkpoint",
    checkpoint_period="train.checkpointer.period",
    max_nonfinite_skips="train.max_nonfinite_skips",
    allow_unsafe_weights="train.allow_unsafe_weights",
    allow_shape_mismatch=None,
    on_bad_data=None,
    lr="optimizer.lr, lr_multiplier's warmup",
    clip="detectron2.solver.build.maybe_add_gradient_clipping",
    coco_datasets="dataloader.coco_datasets",
)


def run_keys(cfg) -> RunKeys:
    """:data:`YAML_KEYS` for a ``CfgNode``, :data:`LAZY_KEYS` for a LazyConfig."""
    return YAML_KEYS if isinstance(cfg, CfgNode) else LAZY_KEYS


def _lazy_names(cfg, split: str) -> Tuple[str, ...]:
    loader = cfg.dataloader.get(split, None)
    if loader is None:
        return ()
    names = loader.dataset.names
    return (names,) if isinstance(names, str) else tuple(names)


def datasets_used(cfg) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """The registered dataset names a run of ``cfg`` reads.

    Returns:
        (train, test): ``DATASETS.TRAIN`` and ``DATASETS.TEST`` of a YAML config, or the
        ``names`` of ``dataloader.train.dataset`` and ``dataloader.test.dataset`` of a
        LazyConfig (empty for a loader it does not define).
    """
    if isinstance(cfg, CfgNode):
        return tuple(cfg.DATASETS.TRAIN), tuple(cfg.DATASETS.TEST)
    return _lazy_names(cfg, "train"), _lazy_names(cfg, "test")
