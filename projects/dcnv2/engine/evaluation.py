"""COCO evaluation that says what its numbers cover: :class:`EvaluatedImagesCOCOEvaluator`
scores only the images it received (an image left out by ``DATASETS.DCNV2.ON_BAD_DATA "skip"``
is not counted as all misses), and :class:`NothingDetectedWarning` says in one line when the
model detected nothing, where detectron2 prints ``No predictions from the model!`` and NaN."""

import itertools
import logging
from typing import List, Optional

from detectron2.evaluation import COCOEvaluator, DatasetEvaluator
from detectron2.utils import comm

__all__ = ["EvaluatedImagesCOCOEvaluator", "NothingDetectedWarning"]

logger = logging.getLogger(__name__)


class EvaluatedImagesCOCOEvaluator(COCOEvaluator):
    """``COCOEvaluator`` whose metrics cover only the images passed to :meth:`process` (on all
    processes together), through ``COCOEvaluator.evaluate(img_ids=...)``; the same as
    ``COCOEvaluator`` when every image was evaluated. Takes ``COCOEvaluator``'s arguments."""

    def reset(self):
        super().reset()
        self._image_ids: List[int] = []

    def process(self, inputs, outputs):
        self._image_ids.extend(x["image_id"] for x in inputs)
        super().process(inputs, outputs)

    def evaluate(self, img_ids: Optional[List[int]] = None):
        if img_ids is None:
            img_ids = self._evaluated_subset()
        return super().evaluate(img_ids=img_ids)

    def _evaluated_subset(self) -> Optional[List[int]]:
        """The evaluated image ids when they are not the whole dataset, else None (on the main
        process; None elsewhere)."""
        seen = self._image_ids
        if self._distributed:
            seen = list(itertools.chain(*comm.gather(seen, dst=0)))
            if not comm.is_main_process():
                return None
        every = set(self._coco_api.getImgIds())
        seen = set(seen) & every
        if seen == every:
            return None
        logger.warning(
            f"Evaluated {len(seen)} of the {len(every)} images of {self._metadata.name}: the "
            f"metrics below are over these {len(seen)} images only "
            f"({len(every) - len(seen)} left out)"
        )
        return sorted(seen)


class NothingDetectedWarning(DatasetEvaluator):
    """Counts the model's detections (``instances``); when there are none over all processes,
    logs one warning on the main process that the model predicted nothing above its score
    threshold. Put it before the metric evaluators (``DatasetEvaluators``); it returns no
    results."""

    def reset(self):
        self._images = self._detections = 0

    def process(self, inputs, outputs):
        for output in outputs:
            if "instances" in output:
                self._images += 1
                self._detections += len(output["instances"])

    def evaluate(self):
        images, detections = map(sum, zip(*comm.all_gather((self._images, self._detections))))
        if comm.is_main_process() and images and not detections:
            logger.warning(
                f"The model predicted no object above its score threshold on the {images} "
                "evaluated images, so the metrics below are NaN: expected early in training "
                "(few iterations, or random weights); otherwise check the weights evaluated"
            )
        return None
