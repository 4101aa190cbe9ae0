"""COCO evaluation over the images that were evaluated.

detectron2's ``COCOEvaluator`` scores predictions against every image of the annotation file: an
image left out of evaluation (``DATASETS.DCNV2.ON_BAD_DATA "skip"``,
:mod:`dcnv2.data.test_loader`) would count as an image where every object was missed, lowering
AP without a word. :class:`EvaluatedImagesCOCOEvaluator` passes the ids of the images it
received to ``COCOEvaluator.evaluate(img_ids=...)``, detectron2's own way to score a subset, and
logs that the metrics are over those images.
"""

import itertools
import logging
from typing import List, Optional

from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

__all__ = ["EvaluatedImagesCOCOEvaluator"]

logger = logging.getLogger(__name__)


class EvaluatedImagesCOCOEvaluator(COCOEvaluator):
    """``COCOEvaluator`` whose metrics cover only the images passed to :meth:`process` (on all
    processes together), when some of the dataset's images were left out; the same as
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
