"""Evaluation data with the training path's handling of bad images (``ON_BAD_DATA``).

"fail" checks every test image's header before the run; "skip" leaves bad images out with one
warning.
"""

import functools
import logging
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts

from ..errors import AnnotationError, ImageReadError
from .images import image_file_problem
from .resumable import _IMAGE_ERRORS, _BadImage
from .validation import OPTION, check_mode, listed, reading_dataset

__all__ = [
    "CheckedTestLoader",
    "build_checked_test_loader",
    "check_test_images",
    "find_bad_images",
    "load_test_dicts",
]

logger = logging.getLogger(__name__)


def find_bad_images(dicts: Sequence[dict]) -> List[Tuple[dict, str]]:
    """``(entry, problem)`` of the entries whose local image file is not usable."""
    bad = []
    for d in dicts:
        name = d.get("file_name")
        if isinstance(name, str) and "://" not in name:  # a local file (PathManager reads URLs)
            problem = image_file_problem(name, d.get("width"), d.get("height"))
            if problem is not None:
                bad.append((d, problem))
    return bad


def check_test_images(dataset_names: Sequence[str], mode: str) -> None:
    """In ``"fail"`` mode, check the test sets' image headers before a run."""
    if check_mode(mode) == "fail":
        for name in dataset_names:
            load_test_dicts(name, mode)


def load_test_dicts(
    dataset_name: str, mode: str = "fail", *, proposal_file: Optional[str] = None
) -> List[dict]:
    """The dataset dicts of a test set; unusable images raise (``"fail"``) or are left out."""
    check_mode(mode)
    with reading_dataset(dataset_name):
        dicts = get_detection_dataset_dicts(
            [dataset_name],
            filter_empty=False,
            proposal_files=[proposal_file] if proposal_file else None,
        )
    bad = find_bad_images(dicts) if isinstance(dicts, list) else []  # else a torch Dataset
    if not bad:
        return dicts
    names = [d["file_name"] for d, _ in bad]
    if mode == "fail":
        more = f" ({len(bad) - 1} more of its {len(dicts)} images too: {listed(names[1:], 5)})"
        more = more if len(bad) > 1 else ""
        raise ImageReadError(
            f"Cannot evaluate on dataset {dataset_name!r}: {bad[0][1]}{more}. "
            f"Replace the file(s), or set {OPTION} skip to evaluate on the other images."
        )
    if len(bad) == len(dicts):
        raise AnnotationError(
            f"Dataset {dataset_name!r}: none of its {len(dicts)} images can be evaluated on "
            f"({bad[0][1]}); expected at least one readable image of its annotated size"
        )
    logger.warning(
        f"Dataset {dataset_name!r}: skipping {len(bad)} of its {len(dicts)} images in evaluation "
        f"({OPTION} is 'skip'): {listed(names, 5)}. First problem: {bad[0][1]}. Its "
        f"metrics are computed over the remaining {len(dicts) - len(bad)} images."
    )
    skipped = {id(d) for d, _ in bad}
    return [d for d in dicts if id(d) not in skipped]


def _map_or_bad_image(mapper: Callable, dataset_dict: dict):
    """``mapper(dataset_dict)``, or a ``_BadImage`` for the main process to report."""
    try:
        return mapper(dataset_dict)
    except _IMAGE_ERRORS as e:
        return _BadImage(dataset_dict.get("file_name"), f"{type(e).__name__}: {e}")


class CheckedTestLoader:
    """Test batches; an unreadable image raises ImageReadError or, with ``skip``, is left out."""

    def __init__(self, loader, *, dataset_name: str, skip: bool):
        self.loader, self.dataset_name, self.skip = loader, dataset_name, skip
        self.skipped: List[str] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[list]:
        for batch in self.loader:
            kept = [item for item in batch if not isinstance(item, _BadImage)]
            for item in batch:
                if not isinstance(item, _BadImage):
                    continue
                what = f"image {item.file_name} of dataset {self.dataset_name!r} in evaluation"
                if not self.skip:
                    raise ImageReadError(
                        f"Cannot read {what}: {item.reason}. Expected a readable image file of "
                        f"the size its annotation gives. Replace the file, or set {OPTION} skip "
                        "to evaluate on the other images."
                    )
                self.skipped.append(item.file_name)
                logger.warning(
                    f"Skipping {what}, which cannot be read ({item.reason}); metrics are computed "
                    "over the other images"
                )
            if kept:
                yield kept


def build_checked_test_loader(
    dataset: List[dict],
    mapper: Callable,
    *,
    dataset_name: str,
    mode: str = "fail",
    num_workers: int = 0,
) -> CheckedTestLoader:
    """detectron2's ``build_detection_test_loader`` over ``dataset``, as a CheckedTestLoader."""
    mapper = functools.partial(_map_or_bad_image, mapper)
    loader = build_detection_test_loader(dataset, mapper=mapper, num_workers=num_workers)
    return CheckedTestLoader(loader, dataset_name=dataset_name, skip=check_mode(mode) == "skip")
