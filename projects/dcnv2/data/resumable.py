"""A training loader whose every batch is a pure function of ``(seed, iteration)``.

A run resumed at iteration ``k`` reads what an uninterrupted run reads from ``k`` on, whatever the
number of processes and workers.
"""

import contextlib
import itertools
import logging
import os
import random
from typing import Any, Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetFromList, MetadataCatalog, build_detection_train_loader
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.utils import comm
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import AnnotationError, ImageReadError
from .mapper import DatasetMapper
from .transforms import build_train_augmentation
from .validation import load_training_dicts

__all__ = [
    "GlobalBatchSampler",
    "ResumableTrainLoader",
    "build_resumable_train_loader",
    "build_train_mapper",
    "sample_seed",
]

logger = logging.getLogger(__name__)

# What reading a missing, unreadable, truncated or wrongly sized image raises in the mapper.
_IMAGE_ERRORS = (OSError, SyntaxError, SizeMismatchError)
# Replacement attempts, in "skip" mode, before giving up on a run of unreadable images.
_MAX_REPLACEMENTS = 16


def sample_seed(seed: int, position: int) -> int:
    """Seed of the random generators while the sample at ``position`` of the stream is mapped."""
    return int(np.random.SeedSequence([seed % 2**32, position]).generate_state(1)[0]) % 2**31


class GlobalBatchSampler(Sampler):
    """This process's slice of each global batch, as lists of ``(dataset index, sample seed)``.

    Args:
        aspect_groups: per item 0 if width > height else 1, or None for no grouping.
    """

    def __init__(
        self,
        size: int,
        total_batch_size: int,
        *,
        seed: int,
        aspect_groups: Optional[Sequence[int]] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ):
        self.rank = comm.get_rank() if rank is None else rank
        self.world_size = comm.get_world_size() if world_size is None else world_size
        if size < 1:
            raise ValueError(f"the training set is empty (size={size})")
        if total_batch_size < 1 or total_batch_size % self.world_size != 0:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH ({total_batch_size}) must be a positive multiple of the "
                f"number of processes ({self.world_size})"
            )
        self.size, self.total_batch_size = size, total_batch_size
        self.batch_size = total_batch_size // self.world_size
        self.seed, self.aspect_groups, self.start_iter = int(seed), aspect_groups, 0

    def global_batches(self) -> Iterator[List[Tuple[int, int]]]:
        """Every process's batches together: lists of (position in the stream, dataset index)."""
        g = torch.Generator()
        g.manual_seed(self.seed)
        # detectron2's TrainingSampler order: one permutation of the dataset after another
        perms = (torch.randperm(self.size, generator=g).tolist() for _ in itertools.count())
        buckets: Tuple[list, list] = ([], [])
        for item in enumerate(itertools.chain.from_iterable(perms)):
            bucket = buckets[self.aspect_groups[item[1]] if self.aspect_groups else 0]
            bucket.append(item)
            if len(bucket) == self.total_batch_size:
                yield bucket[:]
                del bucket[:]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        lo = self.rank * self.batch_size
        batches = itertools.islice(self.global_batches(), self.start_iter, None)
        for batch in batches:
            yield [(i, sample_seed(self.seed, pos)) for pos, i in batch[lo : lo + self.batch_size]]


class _BadImage(NamedTuple):
    """Returned by a worker instead of a sample it cannot map."""

    file_name: Optional[str]
    reason: str
    image: bool = True  # an image that cannot be read, not an annotation that cannot be mapped


@contextlib.contextmanager
def _seeded_rng(seed: int) -> Iterator[None]:
    """Seed the global generators, restoring them afterwards."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


class _SeededMapDataset(Dataset):
    def __init__(self, dicts: Dataset, mapper: Callable, skip_bad_images: bool):
        self.dicts, self.mapper, self.skip_bad_images = dicts, mapper, skip_bad_images
        self._warned = set()

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        idx, seed = key
        n = len(self.dicts)
        for attempt in range(min(n, _MAX_REPLACEMENTS)):
            # "skip": the next item stands in for a bad one, the same one on every run.
            d = self.dicts[(idx + attempt) % n]
            try:
                with _seeded_rng(seed):
                    out = self.mapper(d)
            except Exception as e:  # reported by the main process, not as a worker's traceback
                name = d.get("file_name") if isinstance(d, dict) else None
                reason = f"{type(e).__name__}: {' '.join(str(e).split())}"
                image = isinstance(e, _IMAGE_ERRORS)
                if not (image and self.skip_bad_images):
                    return _BadImage(name, reason, image)
                if name not in self._warned:
                    self._warned.add(name)
                    logger.warning(f"Skipping image {name}, which cannot be read ({reason})")
                continue
            if out is not None:  # a mapper may return None to drop an item
                return out
        return _BadImage(None, f"{_MAX_REPLACEMENTS} consecutive items could not be used")


class ResumableTrainLoader:
    """Iterable of this process's training batches (lists of mapped dicts).

    Args:
        total_batch_size: ``SOLVER.IMS_PER_BATCH``.
        skip_bad_images: replace an unreadable image by the next item, or raise ImageReadError.
    """

    def __init__(
        self,
        dataset_dicts: List[dict],
        mapper: Callable,
        total_batch_size: int,
        *,
        seed: int,
        aspect_ratio_grouping: bool = True,
        num_workers: int = 0,
        skip_bad_images: bool = False,
        dataset_names: Sequence[str] = (),
    ):
        groups = [int(d["width"] <= d["height"]) for d in dataset_dicts]  # landscape: 0
        groups = groups if aspect_ratio_grouping else None
        self.sampler = GlobalBatchSampler(
            len(dataset_dicts), total_batch_size, seed=seed, aspect_groups=groups
        )
        self.dataset = _SeededMapDataset(
            DatasetFromList(dataset_dicts, copy=False), mapper, skip_bad_images
        )
        self.num_workers, self.dataset_names = num_workers, tuple(dataset_names)

    @property
    def seed(self) -> int:
        return self.sampler.seed

    def start_at(self, iteration: int, seed: Optional[int] = None) -> None:
        """Make the next ``iter()`` begin with the batch of ``iteration``."""
        self.sampler.start_iter = int(iteration)
        if seed is not None:
            self.sampler.seed = int(seed)

    def __iter__(self) -> Iterator[List[dict]]:
        # Own generator: drawing from the global one would shift the model's random draws.
        generator = torch.Generator()
        generator.manual_seed(self.sampler.seed)
        loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            collate_fn=list,
            generator=generator,
            worker_init_fn=_own_process_group,
        )
        for batch in loader:
            bad = next((item for item in batch if isinstance(item, _BadImage)), None)
            if bad is not None and not bad.image:
                raise AnnotationError(
                    f"Cannot map training image {bad.file_name}{self._source(bad.file_name)} with "
                    f"its annotations: {bad.reason}. Expected entries of the types COCO defines."
                )
            if bad is not None:
                what = "image " + bad.file_name if bad.file_name else "images"
                raise ImageReadError(
                    f"Cannot read training {what}: {bad.reason}. Expected a readable image file "
                    "of the size its annotation gives. Replace the file, or set "
                    "DATASETS.DCNV2.ON_BAD_DATA skip to train without it."
                )
            yield batch

    def _source(self, file_name: Optional[str]) -> str:
        """ " (dataset 'name', its json)" for the dataset holding ``file_name``, else ""."""
        for name in self.dataset_names:
            meta = MetadataCatalog.get(name)
            root = meta.get("image_root", None)
            folder = os.path.join(os.path.abspath(root), "") if root else None
            if folder and file_name and os.path.abspath(file_name).startswith(folder):
                return f" (dataset {name!r}, {meta.get('json_file', 'no json file')})"
        return ""


def _own_process_group(worker_id: int) -> None:
    # A group signal is the training process's to handle; a killed worker would fail the run.
    os.setpgid(0, 0)


def build_train_mapper(cfg) -> DatasetMapper:
    """dcnv2's ``DatasetMapper(cfg, True)`` with ``INPUT.DCNV2.RESIZE_BACKEND``'s resize."""
    return DatasetMapper(cfg, True, augmentations=build_train_augmentation(cfg))


def _train_loader_from_config(cfg, mapper: Optional[Callable] = None) -> dict:
    mode = cfg.DATASETS.get("DCNV2", {}).get("ON_BAD_DATA", "fail")
    dataset = load_training_dicts(
        list(cfg.DATASETS.TRAIN),
        mode,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=(
            cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
        ),
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        mask_on=cfg.MODEL.MASK_ON,
    )
    mapper = mapper if mapper is not None else build_train_mapper(cfg)
    sampler = None
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        logger.warning(
            f"DATALOADER.SAMPLER_TRAIN is {cfg.DATALOADER.SAMPLER_TRAIN}: using detectron2's "
            "loader, whose data order restarts when a run is resumed"
        )
        sampler = build_detection_train_loader.from_config(cfg, mapper, dataset=dataset)["sampler"]
    return {
        "dataset": dataset,
        "mapper": mapper,
        "sampler": sampler,
        "total_batch_size": cfg.SOLVER.IMS_PER_BATCH,
        "aspect_ratio_grouping": cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        "num_workers": cfg.DATALOADER.NUM_WORKERS,
        "seed": cfg.SEED,
        "on_bad_data": mode,
        "dataset_names": tuple(cfg.DATASETS.TRAIN),
    }


@configurable(from_config=_train_loader_from_config)
def build_resumable_train_loader(
    dataset,
    *,
    mapper: Callable,
    total_batch_size: int,
    sampler=None,
    aspect_ratio_grouping: bool = True,
    num_workers: int = 0,
    seed: Optional[int] = -1,
    on_bad_data: str = "fail",
    dataset_names: Sequence[str] = (),
):
    """detectron2's ``build_detection_train_loader`` as a :class:`ResumableTrainLoader`.

    With a ``sampler`` or a torch ``Dataset``, detectron2's own loader (not resumable) is returned.

    Args:
        seed: of the data stream; negative or None: one drawn and shared by all processes.
        on_bad_data: "skip": replace an unreadable image by the next one; "fail": stop.
    """
    if sampler is not None or not isinstance(dataset, list):
        return build_detection_train_loader(
            dataset=dataset,
            mapper=mapper,
            sampler=sampler,
            total_batch_size=total_batch_size,
            aspect_ratio_grouping=aspect_ratio_grouping,
            num_workers=num_workers,
        )
    return ResumableTrainLoader(
        dataset,
        mapper,
        total_batch_size,
        seed=int(seed) if seed is not None and seed >= 0 else comm.shared_random_seed(),
        aspect_ratio_grouping=aspect_ratio_grouping,
        num_workers=num_workers,
        skip_bad_images=on_bad_data == "skip",
        dataset_names=tuple(dataset_names),
    )
