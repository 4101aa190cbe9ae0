"""Detections of a COCO-format results file drawn beside the ground truth
(``tools/visualize_results.py``; detectron2's ``visualize_json_results.py``)."""

import json
import os
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from ..data.coco import load_category_metadata
from ..engine.eval_output import EVAL_CONFIG, WEIGHTS_RECORD
from ..errors import UserInputError
from .cli import RUN_CONFIG, refuse_existing_outputs
from .demo import read_image

# Height (pixels) of the title strip over each panel of a picture.
TITLE_HEIGHT = 22


def load_results(path: str) -> Dict[Union[int, str], List[dict]]:
    """A COCO results file grouped by image id, or a ``demo.py --json`` file by file name."""
    try:
        with open(path) as f:
            results = json.load(f)
    except OSError as e:
        raise UserInputError(f"cannot read results file {path!r}: {e.strerror or e}") from None
    except ValueError as e:
        raise UserInputError(f"results file {path!r} is not valid JSON: {e}") from None
    names = {}
    if isinstance(results, dict) and "annotations" in results:  # a file of tools/demo.py --json
        names = {i["id"]: os.path.basename(i["file_name"]) for i in results.get("images", [])}
        results = results["annotations"]
    required = ("image_id", "category_id", "bbox", "score")
    if not isinstance(results, list) or not all(
        isinstance(r, dict) and all(k in r for k in required) for r in results
    ):
        raise UserInputError(
            f"results file {path!r} is not a COCO results list; expected [{{'image_id', "
            "'category_id', 'bbox': [x, y, w, h], 'score'}, ...] (OUTPUT_DIR/inference/"
            "coco_instances_results.json)"
        )
    by_image: Dict[Union[int, str], List[dict]] = defaultdict(list)
    for r in results:
        by_image[names.get(r["image_id"], r["image_id"])].append(r)
    return dict(by_image)


def results_config_file(results_path: str) -> Optional[str]:
    """The ``config_eval.yaml`` or ``config.yaml`` of the run whose output holds the results."""
    folder = os.path.dirname(os.path.abspath(results_path))
    evaluated = os.path.isfile(os.path.join(folder, WEIGHTS_RECORD))
    names = (EVAL_CONFIG, RUN_CONFIG) if evaluated else (RUN_CONFIG,)
    found = [os.path.join(os.path.dirname(folder), name) for name in names]
    return next((path for path in found if os.path.isfile(path)), None)


def dataset_from_config(cfg, dataset: Optional[str] = None) -> Tuple[List[dict], object]:
    """Dicts and metadata of ``dataset``, else of the config's first ``DATASETS.TEST``."""
    if not dataset:
        if not len(cfg.DATASETS.TEST):
            raise UserInputError("the config has no DATASETS.TEST: name the dataset with --dataset")
        dataset = cfg.DATASETS.TEST[0]
    if dataset not in DatasetCatalog.list():
        raise UserInputError(
            f"dataset {dataset!r} is not registered; expected a detectron2 or dcnv2 dataset "
            "name, one of the config's DATASETS.DCNV2.COCO, or --json with --image-root"
        )
    dicts = list(DatasetCatalog.get(dataset))
    return dicts, load_category_metadata(dataset)


def dataset_from_json(json_file: str, image_root: str) -> Tuple[List[dict], object]:
    """The dicts and metadata of an unregistered COCO-format ``json_file`` and ``image_root``."""
    for path, what in ((json_file, "--json file"), (image_root, "--image-root folder")):
        if not os.path.exists(path):
            raise UserInputError(f"{what} {path!r} does not exist")
    name = f"__visualize_results:{os.path.abspath(json_file)}"
    dicts = load_coco_json(json_file, image_root, dataset_name=name)
    return dicts, MetadataCatalog.get(name)


def results_to_instances(
    results: Sequence[dict], image_size: Tuple[int, int], metadata, conf_threshold: float
) -> Instances:
    """One image's results with ``score >= conf_threshold`` as ``Instances`` (XYXY, contiguous)."""
    to_contiguous = metadata.get("thing_dataset_id_to_contiguous_id", None) or {}
    chosen = [r for r in results if r["score"] >= conf_threshold]
    unknown = sorted({r["category_id"] for r in chosen if r["category_id"] not in to_contiguous})
    if unknown:
        raise UserInputError(
            f"the results have category id(s) {unknown} that the dataset does not have (its ids: "
            f"{sorted(to_contiguous)}); were they computed on another dataset?"
        )
    boxes = np.asarray([r["bbox"] for r in chosen], dtype=np.float64).reshape(-1, 4)
    instances = Instances(image_size)
    instances.pred_boxes = Boxes(BoxMode.convert(boxes, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS))
    instances.scores = np.asarray([r["score"] for r in chosen], dtype=np.float32)
    instances.pred_classes = np.asarray(
        [to_contiguous[r["category_id"]] for r in chosen], dtype=np.int64
    )
    return instances


def titled_panels(panels: Sequence[Tuple[str, np.ndarray]]) -> np.ndarray:
    """(H_i, W_i, 3) RGB panels side by side, bottom-padded, each under a strip with its title."""
    from PIL import ImageDraw, ImageFont

    height = max(image.shape[0] for _, image in panels)
    font = ImageFont.load_default(size=TITLE_HEIGHT - 8)
    columns = []
    for title, image in panels:
        strip = Image.new("RGB", (image.shape[1], TITLE_HEIGHT), "white")
        ImageDraw.Draw(strip).text((4, 3), title, fill="black", font=font)
        pad = ((0, height - image.shape[0]), (0, 0), (0, 0))
        columns.append(np.concatenate([np.asarray(strip), np.pad(image, pad)], axis=0))
    return np.concatenate(columns, axis=1)


def _output_names(dicts: Sequence[dict]) -> List[str]:
    names = [os.path.basename(d["file_name"]) for d in dicts]
    repeated = {n for n in names if names.count(n) > 1}
    return [
        f"{os.path.splitext(n)[0]}_{d['image_id']}{os.path.splitext(n)[1]}" if n in repeated else n
        for n, d in zip(names, dicts)
    ]


def draw_results(
    dicts: Sequence[dict],
    metadata,
    results: Dict[int, List[dict]],
    output_dir: str,
    *,
    conf_threshold: float = 0.5,
    force: bool = False,
    max_images: Optional[int] = None,
) -> Dict:
    """Write one picture per image (the first ``max_images``) into ``output_dir``: the results
    with ``score >= conf_threshold`` on the left, the ground truth on the right, under titles.

    Returns:
        dict: ``{"images": [{"file", "predictions", "ground_truth"}, ...],
        "unmatched_results": detections of image ids not in the dataset}``.
    """
    if not 0.0 <= conf_threshold <= 1.0:
        raise UserInputError(f"--conf-threshold must be in [0, 1], got {conf_threshold}")
    ids = {d["image_id"] for d in dicts} | {os.path.basename(d["file_name"]) for d in dicts}
    unmatched = sum(len(v) for k, v in results.items() if k not in ids)
    if results and unmatched == sum(len(v) for v in results.values()):
        raise UserInputError(
            f"none of the results' image ids ({sorted(results)[:5]} ...) is an image of the "
            "dataset; were they computed on another dataset?"
        )
    selected = list(dicts)[: max_images if max_images is not None else len(dicts)]
    paths = [os.path.join(output_dir, n) for n in _output_names(selected)]
    refuse_existing_outputs(paths, force, "picture(s)")
    os.makedirs(output_dir, exist_ok=True)
    drawn = []
    for record, path in zip(selected, paths):
        image = read_image(record["file_name"])[:, :, ::-1]
        found = results.get(record["image_id"])
        if found is None:  # a tools/demo.py --json file: by file name
            found = results.get(os.path.basename(record["file_name"]), [])
        instances = results_to_instances(found, image.shape[:2], metadata, conf_threshold)
        predictions = Visualizer(image, metadata).draw_instance_predictions(instances)
        ground_truth = Visualizer(image, metadata).draw_dataset_dict(record)
        panels = [("detections", predictions), ("ground truth", ground_truth)]
        Image.fromarray(titled_panels([(t, v.get_image()) for t, v in panels])).save(path)
        drawn.append(
            {
                "file": path,
                "predictions": len(instances),
                "ground_truth": len(record.get("annotations", [])),
            }
        )
    return {"images": drawn, "unmatched_results": unmatched}
