"""Run a detector on images, folders and videos; draw the detections and optionally save them
as COCO-format JSON (``tools/demo.py``)."""

import itertools
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import Instances
from detectron2.utils.visualizer import Visualizer
from PIL import Image
from tqdm import tqdm

from ..data.coco import load_category_metadata
from ..data.images import image_file_problem
from ..data.images import read_image as dcnv2_read_image
from ..data.transforms import ResizeBackendError
from ..engine.predictor import Predictor
from ..errors import DCNv2Error, UserInputError
from .cli import refuse_existing_outputs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


@dataclass(frozen=True)
class DemoInput:
    """An image or video (``kind``) and the name of its drawing in the output folder."""

    path: str
    kind: str
    output_name: str


def _demo_input(path: str, name: str) -> Optional[DemoInput]:
    ext = os.path.splitext(path)[1].lower()
    if ext in VIDEO_EXTENSIONS:  # written with the mp4v codec, which belongs in an .mp4 file
        return DemoInput(path, "video", os.path.splitext(name)[0] + ".mp4")
    return DemoInput(path, "image", name) if ext in IMAGE_EXTENSIONS else None


def collect_inputs(paths: Sequence[str]) -> List[DemoInput]:
    """Expand files and folders (recursively, sorted; image and video files only) into the inputs
    to run on; UserInputError, before any model is built, for a missing, unknown or unreadable
    path (image header, video that does not open), an empty folder or two inputs drawn to the
    same output."""
    images, videos = ", ".join(IMAGE_EXTENSIONS), ", ".join(VIDEO_EXTENSIONS)
    inputs: List[DemoInput] = []
    for path in paths:
        if os.path.isdir(path):
            files = sorted(os.path.join(root, n) for root, _, names in os.walk(path) for n in names)
            found = [_demo_input(f, os.path.relpath(f, path)) for f in files]
            found = [item for item in found if item is not None]
            if not found:
                raise UserInputError(
                    f"folder {path!r} holds no image ({images}) or video ({videos})"
                )
        elif os.path.isfile(path):
            found = [_demo_input(path, os.path.basename(path))]
            if found[0] is None:
                raise UserInputError(
                    f"{path!r} is neither an image ({images}) nor a video ({videos})"
                )
        else:
            raise UserInputError(f"input {path!r} does not exist")
        inputs += found
    seen: Dict[str, str] = {}
    for item in inputs:
        if item.output_name in seen:
            raise UserInputError(
                f"{seen[item.output_name]!r} and {item.path!r} would both be drawn to "
                f"{item.output_name!r}; rename one or run them separately"
            )
        seen[item.output_name] = item.path
        if item.kind == "video":
            _open_video(item.path).release()
        elif (problem := image_file_problem(item.path)) is not None:
            raise UserInputError(problem)
    return inputs


def read_image(path: str) -> np.ndarray:
    """An image file as a (H, W, 3) uint8 BGR array, upright; UserInputError if unreadable."""
    try:
        return dcnv2_read_image(path, format="BGR")
    except (OSError, ValueError) as e:
        raise UserInputError(f"cannot read image {path!r}: {e}") from None


def _open_video(path: str):
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise UserInputError(f"cannot open video {path!r}; expected a video file")
    return capture


class DemoRunner:
    """A config's :class:`~dcnv2.engine.predictor.Predictor` and the metadata of its classes."""

    def __init__(self, cfg):
        self.cfg = cfg
        try:
            self.predictor = Predictor(cfg)
        except ResizeBackendError as e:
            raise UserInputError(str(e)) from None
        except (OSError, DCNv2Error) as e:  # OSError: also a URL that cannot be fetched
            raise UserInputError(f"cannot load MODEL.WEIGHTS {cfg.MODEL.WEIGHTS!r}: {e}") from None
        name = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused"
        # The dataset's own category ids, for --json (detectron2 maps them on loading only).
        self.metadata = load_category_metadata(name)

    def predict(self, image_bgr: np.ndarray) -> Instances:
        """Detections of one (H, W, 3) uint8 BGR image, on the CPU, in image coordinates."""
        return self.predictor(image_bgr)["instances"].to(torch.device("cpu"))

    def draw(self, image_bgr: np.ndarray, instances: Instances) -> np.ndarray:
        """The image with the detections drawn, as an (H, W, 3) uint8 RGB array."""
        visualizer = Visualizer(image_bgr[:, :, ::-1], self.metadata)
        return visualizer.draw_instance_predictions(instances).get_image()


def run_demo(
    runner: DemoRunner,
    inputs: Sequence[DemoInput],
    output_dir: str,
    json_path: Optional[str] = None,
    force: bool = False,
    progress: bool = True,
) -> Dict:
    """Draw every input into ``output_dir`` (videos as .mp4), optionally the COCO detections into
    ``json_path`` (frames named ``<video>#<index>``, the dataset's category ids); nothing written
    over an output without ``force``.

    Returns:
        dict: ``{"outputs": [paths written], "images": n, "detections": n}``.
    """
    planned = [os.path.join(output_dir, item.output_name) for item in inputs]
    refuse_existing_outputs(planned + ([json_path] if json_path else []), force)
    mapping = runner.metadata.get("thing_dataset_id_to_contiguous_id", None) or {}
    dataset_id = {v: k for k, v in mapping.items()}
    images: List[Dict] = []
    annotations: List[Dict] = []

    def record(name: str, image: np.ndarray, instances: Instances) -> None:
        image_id = len(images) + 1
        height, width = image.shape[:2]
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        for result in instances_to_coco_json(instances, image_id):
            _, _, w, h = result["bbox"]
            category = dataset_id.get(result["category_id"], result["category_id"])
            annotations.append(
                dict(result, id=len(annotations) + 1, category_id=category, area=w * h, iscrowd=0)
            )

    for item, out_path in tqdm(
        list(zip(inputs, planned)), desc="inputs", unit="file", disable=not progress
    ):
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        if item.kind == "video":
            _run_video(runner, item.path, out_path, record, progress)
            continue
        image = read_image(item.path)
        instances = runner.predict(image)
        Image.fromarray(runner.draw(image, instances)).save(out_path)
        record(item.path, image, instances)
    if json_path:
        model = runner.cfg.MODEL
        retinanet = model.META_ARCHITECTURE == "RetinaNet"
        num_classes = (model.RETINANET if retinanet else model.ROI_HEADS).NUM_CLASSES
        names = runner.metadata.get("thing_classes", None) or []
        categories = [
            {"id": dataset_id.get(i, i), "name": names[i] if i < len(names) else f"class_{i}"}
            for i in range(num_classes)
        ]
        os.makedirs(os.path.dirname(json_path) or ".", exist_ok=True)
        with open(json_path, "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
        planned.append(json_path)
    return {"outputs": planned, "images": len(images), "detections": len(annotations)}


def _run_video(runner: DemoRunner, path: str, out_path: str, record, progress: bool) -> None:
    capture = _open_video(path)
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None  # 0: unknown
    writer = None
    try:
        for index in tqdm(
            itertools.count(),
            total=frames,
            desc=os.path.basename(path),
            unit="frame",
            leave=False,
            disable=not progress,
        ):
            ok, frame = capture.read()
            if not ok:
                break
            instances = runner.predict(frame)
            drawn = runner.draw(frame, instances)
            if writer is None:
                size = (drawn.shape[1], drawn.shape[0])
                writer = cv2.VideoWriter(out_path, cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
                if not writer.isOpened():
                    raise UserInputError(f"OpenCV cannot write video {out_path!r}")
            writer.write(np.ascontiguousarray(drawn[:, :, ::-1]))
            record(f"{path}#{index}", frame, instances)
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if writer is None:
        raise UserInputError(f"video {path!r} has no readable frame")
