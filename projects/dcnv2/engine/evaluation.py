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
    processes together), through ``COCOEvaluator.evaluate(img_ids=...)``."""

    def reset(self):
        super().reset()
        self._image_ids: List[int] = []

    def process(self, inputs, outputs):
        self._image_ids.extend(x["image_id"] for x in inputs)
        super().process(inputs, outputs)

    def evaluate(self, img_ids: Optional[List[int]] = None):
        seen = self._image_ids
        if self._distributed:
            seen = list(itertools.chain(*comm.gather(seen, dst=0)))
        if img_ids is None and (comm.is_main_process() or not self._distributed):
            every = set(self._coco_api.getImgIds())
            seen = set(seen) & every
            if seen != every:
                logger.warning(
                    f"Evaluated {len(seen)} of the {len(every)} images of {self._metadata.name}: "
                    f"the metrics below are over these {len(seen)} images only "
                    f"({len(every) - len(seen)} left out)"
                )
                img_ids = sorted(seen)
        return super().evaluate(img_ids=img_ids)


class NothingDetectedWarning(DatasetEvaluator):
    """Warns once (main process) when the model detected nothing on any process. Put it before
    the metric evaluators in ``DatasetEvaluators``; it returns no results."""

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
