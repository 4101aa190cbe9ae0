"""A small deterministic COCO-format dataset (shapes on a texture), so training needs no download.

``import dcnv2`` registers ``dcnv2_synthetic_{train,val}``; a split is generated on first use under
``$DETECTRON2_DATASETS/dcnv2_synthetic/<split>_<fingerprint>/``.
"""

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from PIL import Image, ImageDraw
from tqdm import tqdm

__all__ = [
    "CATEGORIES",
    "SPLITS",
    "generate_synthetic_coco",
    "prepare_synthetic_split",
    "register_synthetic_dataset",
    "synthetic_split_dir",
]

# (name, RGB): saturated colours far from the grey background and from each other.
CATEGORIES: Tuple[Tuple[str, Tuple[int, int, int]], ...] = (
    ("rectangle", (220, 40, 40)),
    ("ellipse", (40, 200, 60)),
    ("triangle", (50, 80, 230)),
)
# Registered splits: name -> (number of images, seed).
SPLITS: Dict[str, Tuple[int, int]] = {"train": (96, 0), "val": (24, 1)}
SUBDIR = "dcnv2_synthetic"

_MIN_SIDE, _MAX_SIDE = 160, 256  # image sides, drawn independently: odd and non-square sizes
# Log-uniform object scale, so COCO's small, medium and large areas all occur.
_MIN_SCALE, _MAX_SCALE = 16, 144
_MAX_OBJECTS = 6
_COLOUR_JITTER = 20  # per channel, so a category is a colour range, not one exact value


# Hash of this code: any change to the generator gives new folders.
_CODE_HASH = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()


def synthetic_split_dir(root: str, split: str, num_images: int, seed: int) -> str:
    """Folder of one generated split under ``root`` (``$DETECTRON2_DATASETS``); may not exist."""
    params = {"split": split, "num_images": num_images, "seed": seed}
    text = json.dumps(params, sort_keys=True) + _CODE_HASH
    return os.path.join(root, SUBDIR, f"{split}_{hashlib.sha1(text.encode()).hexdigest()[:12]}")


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8 grey texture: a random linear gradient, low-frequency blobs and noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gy, gx = rng.uniform(-0.15, 0.15, size=2)
    base = rng.uniform(90, 160) + gy * yy + gx * xx
    coarse = rng.normal(0, 12, size=(h // 16 + 1, w // 16 + 1)).astype(np.float32)
    blobs = np.kron(coarse, np.ones((16, 16), np.float32))[:h, :w]
    img = (base + blobs)[..., None] + rng.normal(0, 8, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_polygon(rng: np.random.Generator, cat: int, box: Tuple[float, float, float, float]):
    """(K, 2) vertices (x, y) of a category-``cat`` shape inscribed in box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    if cat == 0:  # rectangle
        return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)
    if cat == 1:  # ellipse, as a 32-gon so the polygon is what is drawn
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)
    # triangle: a base on one side of the box and an apex on the opposite side
    apex = x0 + rng.uniform(0.2, 0.8) * (x1 - x0)
    if rng.random() < 0.5:
        return np.array([[x0, y1], [x1, y1], [apex, y0]], np.float64)
    return np.array([[x0, y0], [x1, y0], [apex, y1]], np.float64)


def _overlaps(box, boxes, margin: float = 4.0) -> bool:
    x0, y0, x1, y1 = box
    return any(
        x0 < b[2] + margin and b[0] < x1 + margin and y0 < b[3] + margin and b[1] < y1 + margin
        for b in boxes
    )


def _make_image(rng: np.random.Generator, empty: bool):
    """One image and its objects: (H, W, 3) uint8 array, list of (category index, polygon)."""
    h, w = (int(s) for s in rng.integers(_MIN_SIDE, _MAX_SIDE + 1, size=2))
    img = Image.fromarray(_background(rng, h, w))
    draw = ImageDraw.Draw(img)
    objects, boxes = [], []  # (category index, polygon), (x0, y0, x1, y1)
    n = 0 if empty else int(rng.integers(1, _MAX_OBJECTS + 1))
    scales = np.exp(rng.uniform(np.log(_MIN_SCALE), np.log(_MAX_SCALE), size=n))
    ratios = np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=n))  # height / width
    # Largest first: placed last, big objects would rarely find room.
    for scale, ratio in sorted(zip(scales, ratios), reverse=True):
        bw = int(np.clip(round(scale / np.sqrt(ratio)), 8, w))
        bh = int(np.clip(round(scale * np.sqrt(ratio)), 8, h))
        for _ in range(20):  # rejection sampling of a position that overlaps no placed object
            x0 = int(rng.integers(0, w - bw + 1))
            y0 = int(rng.integers(0, h - bh + 1))
            # The shape's pixels will lie inside [x0, x1) x [y0, y1).
            box = (x0, y0, x0 + bw, y0 + bh)
            if not _overlaps(box, boxes):
                break
        else:
            continue  # no room for this one
        cat = int(rng.integers(len(CATEGORIES)))
        poly = _shape_polygon(rng, cat, box)
        colour = np.array(CATEGORIES[cat][1]) + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3)
        colour = tuple(int(c) for c in np.clip(colour, 0, 255))
        # PIL fills the closed polygon, so the shape is drawn shrunk by one pixel to cover exactly
        # the pixels of the annotated box.
        lo, size = np.array(box[:2], np.float64), np.array([bw, bh], np.float64)
        drawn = lo + (poly - lo) * (size - 1) / size
        draw.polygon([tuple(p) for p in drawn], fill=colour)
        objects.append((cat, poly))
        boxes.append(box)
    return np.asarray(img), objects


def generate_synthetic_coco(out_dir: str, num_images: int, seed: int, desc: str = "") -> None:
    """Write ``images/*.png`` and ``annotations.json`` into a new ``out_dir``; deterministic."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    os.makedirs(os.path.join(out_dir, "images"))
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in tqdm(range(num_images), desc=desc or "dcnv2 synthetic data", unit="img"):
        pixels, objects = _make_image(rng, empty=(i == num_images - 1))
        file_name = f"{i + 1:06d}.png"
        Image.fromarray(pixels).save(os.path.join(out_dir, "images", file_name))
        h, w = pixels.shape[:2]
        images.append({"id": i + 1, "file_name": file_name, "height": h, "width": w})
        for cat, poly in objects:
            x0, y0 = poly.min(axis=0)
            x1, y1 = poly.max(axis=0)
            x, y = poly[:, 0], poly[:, 1]
            area = float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": cat + 1,
                    "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                    "area": round(area, 2),
                    "iscrowd": 0,
                    "segmentation": [[round(float(v), 2) for v in poly.reshape(-1)]],
                }
            )
    cats = [{"id": k + 1, "name": c[0], "supercategory": "shape"} for k, c in enumerate(CATEGORIES)]
    info = {"description": "dcnv2 synthetic shapes", "version": "1"}
    coco = dict(info=info, licenses=[], images=images, annotations=annotations, categories=cats)
    with open(os.path.join(out_dir, "annotations.json"), "w") as f:
        json.dump(coco, f, indent=1, sort_keys=True)


def prepare_synthetic_split(root: str, split: str, num_images: int, seed: int) -> str:
    """Generate a split unless its folder exists; return the folder (safe across processes)."""
    out_dir = synthetic_split_dir(root, split, num_images, seed)
    if os.path.isfile(os.path.join(out_dir, "annotations.json")):
        return out_dir
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{os.path.basename(out_dir)}.", dir=parent) as tmp:
        work = os.path.join(tmp, "split")
        generate_synthetic_coco(work, num_images, seed, desc=f"{SUBDIR} {split} -> {parent}")
        try:
            os.rename(work, out_dir)
        except OSError:
            # Another process renamed its identical copy first; use it.
            if not os.path.isfile(os.path.join(out_dir, "annotations.json")):
                raise
    return out_dir


def _load(name: str, *split_args) -> List[dict]:
    out_dir = prepare_synthetic_split(*split_args)
    return load_coco_json(f"{out_dir}/annotations.json", f"{out_dir}/images", name)


def register_synthetic_dataset(
    name: str, root: str, split: str, num_images: int, seed: int
) -> None:
    """Register a synthetic split without generating it; its metadata's ``prepare`` does."""
    out_dir = synthetic_split_dir(root, split, num_images, seed)
    args = (root, split, num_images, seed)
    DatasetCatalog.register(name, functools.partial(_load, name, *args))
    MetadataCatalog.get(name).set(
        json_file=os.path.join(out_dir, "annotations.json"),
        image_root=os.path.join(out_dir, "images"),
        evaluator_type="coco",
        thing_classes=[c[0] for c in CATEGORIES],
        thing_colors=[c[1] for c in CATEGORIES],
        prepare=functools.partial(prepare_synthetic_split, *args),
    )


# Registered at import under $DETECTRON2_DATASETS, like detectron2's builtin datasets.
_ROOT = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
for _split, (_num, _seed) in SPLITS.items():
    register_synthetic_dataset(f"dcnv2_synthetic_{_split}", _ROOT, _split, _num, _seed)
