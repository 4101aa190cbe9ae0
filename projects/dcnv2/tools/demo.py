"""Run a detector on images, folders and videos; draw the detections and optionally save them
as COCO-format JSON (``tools/demo.py``)."""

import json
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
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

__all__ = [
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "DemoInput",
    "check_readable",
    "collect_inputs",
    "read_image",
    "iter_video_frames",
    "DemoRunner",
    "instances_to_coco",
    "run_demo",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


@dataclass(frozen=True)
class DemoInput:
    """An image or video (``kind``) and the name of its drawing in the output folder."""

    path: str
    kind: str
    output_name: str


def _kind(path: str) -> Optional[str]:
    ext = os.path.splitext(path)[1].lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    return None


def _video_output_name(name: str) -> str:
    # Videos are written with the mp4v codec, which belongs in an .mp4 container.
    return os.path.splitext(name)[0] + ".mp4"


def collect_inputs(paths: Sequence[str]) -> List[DemoInput]:
    """Expand files and folders (recursively, sorted; image and video files only) into the inputs
    to run on, each checked readable; UserInputError for a missing, unknown or unreadable path, an
    empty folder or two inputs drawn to the same output."""
    if not paths:
        raise UserInputError("no input given: pass image files, folders of images or videos")
    inputs: List[DemoInput] = []
    for path in paths:
        if os.path.isdir(path):
            found = []
            for root, _, files in os.walk(path):
                for name in files:
                    full = os.path.join(root, name)
                    kind = _kind(full)
                    if kind is not None:
                        found.append((full, kind))
            if not found:
                raise UserInputError(
                    f"folder {path!r} holds no image ({', '.join(IMAGE_EXTENSIONS)}) or video "
                    f"({', '.join(VIDEO_EXTENSIONS)})"
                )
            for full, kind in sorted(found):
                rel = os.path.relpath(full, path)
                inputs.append(
                    DemoInput(full, kind, _video_output_name(rel) if kind == "video" else rel)
                )
        elif os.path.isfile(path):
            kind = _kind(path)
            if kind is None:
                raise UserInputError(
                    f"{path!r} is neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor a video "
                    f"({', '.join(VIDEO_EXTENSIONS)})"
                )
            name = os.path.basename(path)
            inputs.append(
                DemoInput(path, kind, _video_output_name(name) if kind == "video" else name)
            )
        else:
            raise UserInputError(f"input {path!r} does not exist")
    seen: Dict[str, str] = {}
    for item in inputs:
        if item.output_name in seen:
            raise UserInputError(
                f"{seen[item.output_name]!r} and {item.path!r} would both be drawn to "
                f"{item.output_name!r}; rename one or run them separately"
            )
        seen[item.output_name] = item.path
    check_readable(inputs)
    return inputs


def check_readable(inputs: Sequence[DemoInput]) -> None:
    """Check, before any model is built, that each image's header decodes and each video opens."""
    for item in inputs:
        if item.kind == "image":
            problem = image_file_problem(item.path)
            if problem is not None:
                raise UserInputError(problem)
        else:
            capture = _cv2().VideoCapture(item.path)
            opened = capture.isOpened()
            capture.release()
            if not opened:
                raise UserInputError(f"cannot open video {item.path!r}; expected a video file")


def read_image(path: str) -> np.ndarray:
    """An image file as a (H, W, 3) uint8 BGR array, upright; UserInputError if unreadable."""
    try:
        return dcnv2_read_image(path, format="BGR")
    except (OSError, ValueError) as e:
        raise UserInputError(f"cannot read image {path!r}: {e}") from None


def _cv2():
    try:
        import cv2
    except ImportError:
        raise UserInputError(
            "reading and writing videos needs OpenCV: pip install opencv-python-headless"
        ) from None
    return cv2


def iter_video_frames(path: str) -> Tuple[Iterator[np.ndarray], Dict[str, float]]:
    """A video's (H, W, 3) uint8 BGR frames and ``{"fps", "frames" (0: unknown), "width",
    "height"}``."""
    cv2 = _cv2()
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise UserInputError(f"cannot open video {path!r}")
    info = {
        "fps": capture.get(cv2.CAP_PROP_FPS) or 25.0,
        "frames": int(capture.get(cv2.CAP_PROP_FRAME_COUNT)),
        "width": int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
        "height": int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
    }

    def frames():
        try:
            while True:
                ok, frame = capture.read()
                if not ok:
                    return
                yield frame
        finally:
            capture.release()

    return frames(), info


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


def coco_categories(metadata, num_classes: int) -> List[Dict]:
    """COCO ``categories``: the dataset's ids and names, else the index and ``class_<index>``."""
    names = list(metadata.get("thing_classes", []) or [])
    to_dataset = _contiguous_to_dataset_id(metadata)
    categories = []
    for i in range(num_classes):
        name = names[i] if i < len(names) else f"class_{i}"
        categories.append({"id": to_dataset.get(i, i), "name": name})
    return categories


def _contiguous_to_dataset_id(metadata) -> Dict[int, int]:
    mapping = metadata.get("thing_dataset_id_to_contiguous_id", None) or {}
    return {v: k for k, v in mapping.items()}


def instances_to_coco(
    instances: Instances, image_id: int, metadata, first_annotation_id: int = 1
) -> List[Dict]:
    """One image's detections as COCO results (``loadRes`` format) in the dataset's category ids."""
    to_dataset = _contiguous_to_dataset_id(metadata)
    boxes = instances.pred_boxes.tensor.tolist() if len(instances) else []
    scores = instances.scores.tolist() if len(instances) else []
    classes = instances.pred_classes.tolist() if len(instances) else []
    annotations = []
    for k, ((x0, y0, x1, y1), score, cls) in enumerate(zip(boxes, scores, classes)):
        w, h = x1 - x0, y1 - y0
        annotations.append(
            {
                "id": first_annotation_id + k,
                "image_id": image_id,
                "category_id": to_dataset.get(cls, cls),
                "bbox": [round(v, 2) for v in (x0, y0, w, h)],
                "area": round(w * h, 2),
                "score": round(float(score), 5),
                "iscrowd": 0,
            }
        )
    return annotations


def run_demo(
    runner: DemoRunner,
    inputs: Sequence[DemoInput],
    output_dir: str,
    json_path: Optional[str] = None,
    force: bool = False,
    progress: bool = True,
) -> Dict:
    """Draw every input into ``output_dir`` (videos as .mp4), optionally the COCO detections into
    ``json_path`` (frames named ``<video>#<index>``); nothing written over an output without
    ``force``.

    Returns:
        dict: ``{"outputs": [paths written], "images": n, "detections": n}``.
    """
    planned = [os.path.join(output_dir, item.output_name) for item in inputs]
    if json_path:
        planned.append(json_path)
    refuse_existing_outputs(planned, force)
    images: List[Dict] = []
    annotations: List[Dict] = []
    written: List[str] = []

    def record(name: str, image: np.ndarray, instances: Instances) -> None:
        image_id = len(images) + 1
        images.append(
            {"id": image_id, "file_name": name, "height": image.shape[0], "width": image.shape[1]}
        )
        annotations.extend(
            instances_to_coco(instances, image_id, runner.metadata, len(annotations) + 1)
        )

    for item, out_path in tqdm(
        list(zip(inputs, planned)), desc="inputs", unit="file", disable=not progress
    ):
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        if item.kind == "image":
            image = read_image(item.path)
            instances = runner.predict(image)
            Image.fromarray(runner.draw(image, instances)).save(out_path)
            record(item.path, image, instances)
        else:
            _run_video(runner, item, out_path, record, progress)
        written.append(out_path)
    if json_path:
        os.makedirs(os.path.dirname(json_path) or ".", exist_ok=True)
        num_classes = runner.cfg.MODEL.ROI_HEADS.NUM_CLASSES
        if runner.cfg.MODEL.META_ARCHITECTURE == "RetinaNet":
            num_classes = runner.cfg.MODEL.RETINANET.NUM_CLASSES
        with open(json_path, "w") as f:
            json.dump(
                {
                    "images": images,
                    "annotations": annotations,
                    "categories": coco_categories(runner.metadata, num_classes),
                },
                f,
            )
        written.append(json_path)
    return {"outputs": written, "images": len(images), "detections": len(annotations)}


def _run_video(runner: DemoRunner, item: DemoInput, out_path: str, record, progress: bool) -> None:
    cv2 = _cv2()
    frames, info = iter_video_frames(item.path)
    writer = None
    try:
        for index, frame in enumerate(
            tqdm(
                frames,
                total=info["frames"] or None,
                desc=os.path.basename(item.path),
                unit="frame",
                leave=False,
                disable=not progress,
            )
        ):
            instances = runner.predict(frame)
            drawn = runner.draw(frame, instances)
            if writer is None:
                fourcc = cv2.VideoWriter_fourcc(*"mp4v")
                size = (drawn.shape[1], drawn.shape[0])
                writer = cv2.VideoWriter(out_path, fourcc, float(info["fps"]), size)
                if not writer.isOpened():
                    raise UserInputError(f"OpenCV cannot write video {out_path!r}")
            writer.write(np.ascontiguousarray(drawn[:, :, ::-1]))
            record(f"{item.path}#{index}", frame, instances)
    finally:
        if writer is not None:
            writer.release()
    if writer is None:
        raise UserInputError(f"video {item.path!r} has no readable frame")
