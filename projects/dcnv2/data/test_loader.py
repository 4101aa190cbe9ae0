"""Evaluation data with the training path's handling of bad images (``ON_BAD_DATA``).

"fail" checks every test image's header before the run; "skip" leaves bad images out with one
warning.
"""

import logging
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts

from ..errors import AnnotationError, ImageReadError
from .images import image_file_problem
from .resumable import _IMAGE_ERRORS, _BadImage
from .validation import check_mode, reading_dataset

__all__ = [
    "CheckedTestLoader",
    "build_checked_test_loader",
    "check_test_images",
    "find_bad_images",
    "load_test_dicts",
]

logger = logging.getLogger(__name__)

_OPTION = "DATASETS.DCNV2.ON_BAD_DATA"
_LISTED = 5


def find_bad_images(dicts: Sequence[dict]) -> List[Tuple[dict, str]]:
    """``(entry, problem)`` of the entries whose local image file is not usable."""
    bad = []
    for d in dicts:
        name = d.get("file_name") if isinstance(d, dict) else None
        if not isinstance(name, str) or "://" in name:
            continue  # no local file to check (read by PathManager, or not from a file)
        problem = image_file_problem(name, d.get("width"), d.get("height"))
        if problem is not None:
            bad.append((d, problem))
    return bad


def _fail_message(dataset_name: str, bad: List[Tuple[dict, str]], total: int) -> str:
    more = ""
    if len(bad) > 1:
        names = ", ".join(d["file_name"] for d, _ in bad[1 : 1 + _LISTED])
        extra = len(bad) - 1 - _LISTED
        more = f" ({len(bad) - 1} more of its {total} images too: {names}"
        more += f", ... and {extra} more)" if extra > 0 else ")"
    return (
        f"Cannot evaluate on dataset {dataset_name!r}: {bad[0][1]}{more}. Replace the file(s), "
        f"or set {_OPTION} skip to evaluate on the other images."
    )


def _skipped_text(file_names: Sequence[str]) -> str:
    text = ", ".join(file_names[:_LISTED])
    return text + (
        f", ... and {len(file_names) - _LISTED} more" if len(file_names) > _LISTED else ""
    )


def check_test_images(dataset_names: Sequence[str], mode: str) -> None:
    """In ``"fail"`` mode, check the test sets' image headers before a run."""
    if check_mode(mode) != "fail":
        return
    for name in dataset_names:
        with reading_dataset(name):
            dicts = get_detection_dataset_dicts([name], filter_empty=False)
        if not isinstance(dicts, list):
            continue  # a registered torch Dataset: read as it is
        bad = find_bad_images(dicts)
        if bad:
            raise ImageReadError(_fail_message(name, bad, len(dicts)))


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
    bad = find_bad_images(dicts) if isinstance(dicts, list) else []
    if not bad:
        return dicts
    if mode == "fail":
        raise ImageReadError(_fail_message(dataset_name, bad, len(dicts)))
    names = [d["file_name"] for d, _ in bad]
    if len(bad) == len(dicts):
        raise AnnotationError(
            f"Dataset {dataset_name!r}: none of its {len(dicts)} images can be evaluated on "
            f"({bad[0][1]}); expected at least one readable image of its annotated size"
        )
    logger.warning(
        f"Dataset {dataset_name!r}: skipping {len(bad)} of its {len(dicts)} images in evaluation "
        f"({_OPTION} is 'skip'): {_skipped_text(names)}. First problem: {bad[0][1]}. Its "
        f"metrics are computed over the remaining {len(dicts) - len(bad)} images."
    )
    skipped = {id(d) for d, _ in bad}
    return [d for d in dicts if id(d) not in skipped]


class _CatchImageErrors:
    """A mapper returning a ``_BadImage`` for an unreadable image, for the main process."""

    def __init__(self, mapper: Callable):
        self.mapper = mapper

    def __call__(self, dataset_dict: dict):
        try:
            return self.mapper(dataset_dict)
        except _IMAGE_ERRORS as e:
            return _BadImage(dataset_dict.get("file_name"), f"{type(e).__name__}: {e}")


class CheckedTestLoader:
    """Test batches; an unreadable image raises ImageReadError or, with ``skip``, is left out."""

    def __init__(self, loader, *, dataset_name: str, skip: bool):
        self.loader = loader
        self.dataset_name = dataset_name
        self.skip = skip
        self.skipped: List[str] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[list]:
        for batch in self.loader:
            kept = []
            for item in batch:
                if not isinstance(item, _BadImage):
                    kept.append(item)
                elif not self.skip:
                    raise ImageReadError(
                        f"Cannot read image {item.file_name} of dataset {self.dataset_name!r} "
                        f"in evaluation: {item.reason}. Expected a readable image file of the "
                        f"size its annotation gives. Replace the file, or set {_OPTION} skip "
                        "to evaluate on the other images."
                    )
                else:
                    self.skipped.append(item.file_name)
                    logger.warning(
                        f"Skipping image {item.file_name} of dataset {self.dataset_name!r} in "
                        f"evaluation, which cannot be read ({item.reason}); metrics are "
                        "computed over the other images"
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
    loader = build_detection_test_loader(
        dataset, mapper=_CatchImageErrors(mapper), num_workers=num_workers
    )
    return CheckedTestLoader(loader, dataset_name=dataset_name, skip=check_mode(mode) == "skip")
