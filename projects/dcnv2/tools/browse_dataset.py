"""A dataset's images with their annotations after the training augmentations
(``tools/browse_dataset.py``; detectron2's ``visualize_data.py --source dataloader``)."""

import copy
import os
import random
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.structures import Instances
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from ..data.resumable import build_train_mapper
from ..data.validation import load_training_dicts
from ..errors import UserInputError
from .cli import refuse_existing_outputs
from .visualize_results import titled_panels

__all__ = ["browse_dataset", "draw_annotations", "mapped_samples"]


def mapped_samples(cfg, names: Sequence[str], num: int, seed: int = 0) -> List[dict]:
    """The first ``num`` training images of ``names`` through the config's training mapper:
    ``{"record", "image" (RGB, augmented), "instances"}`` each."""
    if num < 1:
        raise UserInputError(f"--num must be at least 1, got {num}")
    dicts = load_training_dicts(
        list(names), "fail", filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    )
    mapper = build_train_mapper(cfg)
    # The augmentations draw from numpy's (and python's) global generators.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    samples = []
    for record in list(dicts)[:num]:
        mapped = mapper(copy.deepcopy(record))
        image = mapped["image"].permute(1, 2, 0).numpy()
        samples.append(
            {
                "record": record,
                "image": utils.convert_image_to_rgb(image, cfg.INPUT.FORMAT),
                "instances": mapped.get("instances", Instances(image.shape[:2])),
            }
        )
    return samples


def draw_annotations(image_rgb: np.ndarray, instances: Instances, metadata) -> np.ndarray:
    """``instances``' ground truth drawn on ``image_rgb``; (H, W, 3) uint8 RGB."""
    fields = instances.get_fields()
    names = metadata.get("thing_classes", None)
    classes = fields.get("gt_classes", torch.zeros(0, dtype=torch.int64)).tolist()
    labels = [names[c] if names and c < len(names) else str(c) for c in classes]
    visualizer = Visualizer(image_rgb, metadata=metadata)
    drawn = visualizer.overlay_instances(
        labels=labels,
        boxes=fields.get("gt_boxes", None),
        masks=fields.get("gt_masks", None),
        keypoints=fields.get("gt_keypoints", None),
    )
    return drawn.get_image()


def browse_dataset(
    cfg,
    output_dir: str,
    *,
    num: int = 10,
    dataset: Optional[str] = None,
    show_original: bool = False,
    force: bool = False,
    seed: int = 0,
) -> Dict:
    """Draw the first ``num`` augmented images of ``DATASETS.TRAIN`` (or ``dataset``) with their
    annotations into ``output_dir``; ``show_original``: the stored image beside each.

    Returns:
        dict: ``{"images": [{"file", "instances", "original_size"}, ...]}``.
    """
    names = [dataset] if dataset else list(cfg.DATASETS.TRAIN)
    if not names:
        raise UserInputError("the config has no DATASETS.TRAIN: name one with --dataset")
    metadata = MetadataCatalog.get(names[0])
    samples = mapped_samples(cfg, names, num, seed)
    paths = [os.path.join(output_dir, os.path.basename(s["record"]["file_name"])) for s in samples]
    refuse_existing_outputs(paths, force, "picture(s)")
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for sample, path in zip(samples, paths):
        picture = draw_annotations(sample["image"], sample["instances"], metadata)
        record = sample["record"]
        if show_original:
            original = utils.read_image(record["file_name"], format="RGB")
            stored = Visualizer(original, metadata=metadata).draw_dataset_dict(record)
            picture = titled_panels([("original", stored.get_image()), ("as trained", picture)])
        Image.fromarray(picture).save(path)
        written.append(
            {
                "file": path,
                "instances": sample["instances"],
                "original_size": (record["height"], record["width"]),
            }
        )
    return {"images": written}
