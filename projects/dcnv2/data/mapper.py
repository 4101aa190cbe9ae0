"""detectron2's ``DatasetMapper`` reading images with :func:`dcnv2.data.images.read_image`."""

import copy

import numpy as np
import torch
from detectron2.data import DatasetMapper as D2DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .images import read_image

__all__ = ["DatasetMapper"]


class DatasetMapper(D2DatasetMapper):
    """detectron2's ``DatasetMapper`` whose ``__call__`` uses :func:`.images.read_image`."""

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)  # it will be modified by code below
        size = dataset_dict.get("width"), dataset_dict.get("height")
        expected = size if None not in size else None
        image = read_image(dataset_dict["file_name"], self.image_format, expected_size=expected)
        utils.check_image_size(dataset_dict, image)  # fills a missing width/height

        sem_seg_file = dataset_dict.pop("sem_seg_file_name", None)
        sem_seg_gt = utils.read_image(sem_seg_file, "L").squeeze(2) if sem_seg_file else None
        aug_input = T.AugInput(image, sem_seg=sem_seg_gt)
        transforms = self.augmentations(aug_input)
        image, sem_seg_gt = aug_input.image, aug_input.sem_seg

        image_shape = image.shape[:2]  # h, w
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg_gt is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg_gt.astype("long"))

        if self.proposal_topk is not None:
            utils.transform_proposals(
                dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk
            )

        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict

        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict
