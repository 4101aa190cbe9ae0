"""A dataset's images with their annotations after the training augmentations
(``tools/browse_dataset.py``; detectron2's ``visualize_data.py --source dataloader``)."""

import copy
import os
from typing import Dict, Optional

from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.structures import Instances
from detectron2.utils.env import seed_all_rng
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from ..data.resumable import build_train_mapper
from ..data.validation import load_training_dicts
from ..errors import UserInputError
from .cli import refuse_existing_outputs
from .visualize_results import titled_panels


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
    """Draw the first ``num`` training images of ``DATASETS.TRAIN`` (or ``dataset``), after the
    config's training mapper, with their annotations into ``output_dir``; ``show_original``: the
    stored image beside each.

    Returns:
        dict: ``{"images": [{"file", "instances" (as trained), "original_size"}, ...]}``.
    """
    if num < 1:
        raise UserInputError(f"--num must be at least 1, got {num}")
    names = [dataset] if dataset else list(cfg.DATASETS.TRAIN)
    if not names:
        raise UserInputError("the config has no DATASETS.TRAIN: name one with --dataset")
    metadata = MetadataCatalog.get(names[0])
    filter_empty = cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    records = list(load_training_dicts(names, "fail", filter_empty=filter_empty))[:num]
    paths = [os.path.join(output_dir, os.path.basename(r["file_name"])) for r in records]
    refuse_existing_outputs(paths, force, "picture(s)")
    mapper = build_train_mapper(cfg)
    # The augmentations draw from the global generators, and so do the Visualizer's colours:
    # all images are mapped before any is drawn.
    seed_all_rng(seed)
    samples = [mapper(copy.deepcopy(record)) for record in records]
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for record, sample, path in zip(records, samples, paths):
        image = utils.convert_image_to_rgb(sample["image"].permute(1, 2, 0), cfg.INPUT.FORMAT)
        instances = sample.get("instances", Instances(image.shape[:2]))
        fields = instances.get_fields()
        classes = fields["gt_classes"].tolist() if "gt_classes" in fields else []
        things = metadata.get("thing_classes", None) or []
        labels = [things[c] if c < len(things) else str(c) for c in classes]
        picture = Visualizer(image, metadata=metadata).overlay_instances(
            labels=labels,
            boxes=fields.get("gt_boxes", None),
            masks=fields.get("gt_masks", None),
            keypoints=fields.get("gt_keypoints", None),
        )
        picture = picture.get_image()
        if show_original:
            original = utils.read_image(record["file_name"], format="RGB")
            stored = Visualizer(original, metadata=metadata).draw_dataset_dict(record)
            picture = titled_panels([("original", stored.get_image()), ("as trained", picture)])
        Image.fromarray(picture).save(path)
        size = (record["height"], record["width"])
        written.append({"file": path, "instances": instances, "original_size": size})
    return {"images": written}
