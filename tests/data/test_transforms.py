"""MMDetection's resize (``INPUT.DCNV2.RESIZE_BACKEND opencv``): output size by mmcv's
``rescale_size`` and pixels by ``cv2.resize(..., INTER_LINEAR)``, bit for bit; boxes, polygons
and masks transformed consistently; detectron2's resize kept by default ("pil")."""

import copy

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from PIL import Image
from pycocotools import mask as mask_util

import dcnv2
from dcnv2.data import build_test_augmentation, build_train_augmentation
from dcnv2.data.transforms import (
    OpenCVResizeShortestEdge,
    OpenCVResizeTransform,
    ResizeBackendError,
    mmdet_rescale_size,
)
from dcnv2.errors import DCNv2Error

MMDET = "configs/mmdet/faster_rcnn_R50_mdconv_FPN_1x_mmdet.yaml"


def _mmcv_size(h, w, scale=(1333, 800)):
    """mmcv's rescale_size for a tuple scale, written out: (new_h, new_w)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def _image(h, w, channels=3, seed=0):
    # Smooth content with noise: bilinear filters of PIL and OpenCV give different values.
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = 127 + 60 * np.sin(x / 7.0)[..., None] * np.cos(y / 5.0)[..., None]
    noisy = base + rng.normal(0, 25, (h, w, channels))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _resized(cfg, image):
    aug_input = T.AugInput(image)
    transforms = T.AugmentationList(build_test_augmentation(cfg))(aug_input)
    return aug_input.image, transforms


def _cfg(backend="opencv", *opts):
    return dcnv2.get_cfg(MMDET, ["INPUT.DCNV2.RESIZE_BACKEND", backend, *opts])


# (h, w): landscape, portrait, square, very long (the long side limits), tiny, and 735 x 1470,
# where detectron2's size rule gives 666 x 1333 and mmcv's 667 x 1333.
SIZES = [(300, 451), (451, 300), (640, 640), (200, 1000), (17, 23), (735, 1470), (1067, 801)]


@pytest.mark.parametrize("h,w", SIZES)
def test_opencv_resize_is_cv2_resize_at_mmdetections_size(h, w):
    image = _image(h, w)
    out, transforms = _resized(_cfg(), image)
    new_h, new_w = _mmcv_size(h, w)
    assert out.dtype == np.uint8 and out.shape == (new_h, new_w, 3)
    expected = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(out, expected)
    assert mmdet_rescale_size(h, w, 800, 1333) == (new_h, new_w)
    assert len(transforms) == 1 and isinstance(transforms[0], OpenCVResizeTransform)


def test_sizes_by_hand():
    # 300 x 451: factor min(1333 / 451, 800 / 300) = 8 / 3; 451 * 8 / 3 = 1202.67 -> 1203.
    assert mmdet_rescale_size(300, 451, 800, 1333) == (800, 1203)
    # 200 x 1000: factor 1.333; 200 * 1.333 = 266.6 -> 267.
    assert mmdet_rescale_size(200, 1000, 800, 1333) == (267, 1333)
    assert mmdet_rescale_size(735, 1470, 800, 1333) == (667, 1333)
    assert T.ResizeShortestEdge.get_output_shape(735, 1470, 800, 1333) == (666, 1333)


@pytest.mark.parametrize("h,w", [(300, 451), (451, 300), (97, 131)])
def test_pil_and_opencv_differ_where_the_default_is_detectron2s(h, w):
    image = _image(h, w)
    opencv, _ = _resized(_cfg("opencv"), image)
    pil, _ = _resized(_cfg("pil"), image)
    assert opencv.shape == pil.shape
    assert (opencv != pil).mean() > 0.05  # PIL's and OpenCV's bilinear really differ here
    new_h, new_w = pil.shape[:2]
    expected = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    assert np.array_equal(pil, expected)  # "pil" is detectron2's ResizeShortestEdge


def test_float_grey_and_single_channel_images():
    resize = OpenCVResizeTransform(20, 30, 41, 61)
    grey = _image(20, 30, 1)
    out = resize.apply_image(grey)
    assert out.shape == (41, 61, 1)
    expected = cv2.resize(grey[:, :, 0], (61, 41), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(out[:, :, 0], expected)
    assert resize.apply_image(grey[:, :, 0]).shape == (41, 61)
    floats = _image(20, 30).astype(np.float32) / 255
    out = resize.apply_image(floats)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, cv2.resize(floats, (61, 41)))
    with pytest.raises(ValueError, match="for 20x30 images got an image of shape"):
        resize.apply_image(_image(21, 30))


def test_boxes_polygons_and_masks_follow_the_image():
    h, w = 90, 140
    image = np.zeros((h, w, 3), np.uint8)
    image[20:50, 30:100] = 255  # a white rectangle covering pixels [30, 100) x [20, 50)
    box = [30.0, 20.0, 100.0, 50.0]
    polygon = [30.0, 20.0, 100.0, 20.0, 100.0, 50.0, 30.0, 50.0]
    mask = np.zeros((h, w), np.uint8)
    mask[20:50, 30:100] = 1
    annotations = [
        {"bbox": box, "bbox_mode": 0, "category_id": 0, "segmentation": [polygon]},
        {"bbox": box, "bbox_mode": 0, "category_id": 0,
         "segmentation": mask_util.encode(np.asfortranarray(mask))},
    ]  # fmt: skip
    out, transforms = _resized(_cfg(), image)
    new_h, new_w = out.shape[:2]
    assert (new_h, new_w) == _mmcv_size(h, w) == (800, 1244)
    sx, sy = new_w / w, new_h / h  # MMDetection's scale_factor
    expected_box = np.array([30 * sx, 20 * sy, 100 * sx, 50 * sy])
    rect = out[:, :, 0] > 127
    ys, xs = np.nonzero(rect)
    # The resized rectangle lies where the transformed box says, to a pixel.
    assert abs(xs.min() - expected_box[0]) <= 1 and abs(xs.max() + 1 - expected_box[2]) <= 1
    assert abs(ys.min() - expected_box[1]) <= 1 and abs(ys.max() + 1 - expected_box[3]) <= 1
    for anno in annotations:
        moved = utils.transform_instance_annotations(
            copy.deepcopy(anno), transforms, (new_h, new_w)
        )
        np.testing.assert_allclose(moved["bbox"], expected_box, rtol=1e-6)
    instances = utils.annotations_to_instances(
        [
            utils.transform_instance_annotations(
                copy.deepcopy(annotations[0]), transforms, out.shape[:2]
            )
        ],
        out.shape[:2],
    )
    np.testing.assert_allclose(
        instances.gt_masks.polygons[0][0], np.array(polygon) * np.tile([sx, sy], 4), rtol=1e-6
    )
    moved_mask = utils.transform_instance_annotations(
        copy.deepcopy(annotations[1]), transforms, (new_h, new_w)
    )["segmentation"]
    assert moved_mask.shape == (new_h, new_w)
    assert np.array_equal(
        moved_mask, cv2.resize(mask, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
    )
    # Nearest-neighbour masks and the bilinear image agree on the object, away from its border.
    assert (moved_mask.astype(bool) == rect).mean() > 0.995
    # The inverse maps boxes back.
    back = transforms.inverse().apply_box(expected_box[None].copy())
    np.testing.assert_allclose(back[0], box, rtol=1e-6)


def test_boolean_masks():
    resize = OpenCVResizeTransform(10, 12, 25, 31)
    mask = np.zeros((10, 12), bool)
    mask[2:7, 3:9] = True
    out = resize.apply_segmentation(mask)
    assert out.dtype == bool and out.shape == (25, 31)
    expected = cv2.resize(mask.astype(np.uint8), (31, 25), interpolation=cv2.INTER_NEAREST)
    assert np.array_equal(out, expected.astype(bool))


def test_train_augmentation_default_is_detectron2s_and_opencv_swaps_only_the_resize():
    for opts in ([], ["INPUT.CROP.ENABLED", "True", "INPUT.RANDOM_FLIP", "vertical"]):
        cfg = dcnv2.get_cfg("faster_rcnn_R50_mdconv_FPN_1x.yaml", opts)
        assert cfg.INPUT.DCNV2.RESIZE_BACKEND == "pil"
        detectron2s = DatasetMapper(cfg, True).augmentations.augs
        ours = build_train_augmentation(cfg)
        assert [repr(a) for a in ours] == [repr(a) for a in detectron2s]
        cfg.INPUT.DCNV2.RESIZE_BACKEND = "opencv"
        opencv = build_train_augmentation(cfg)
        assert [type(a) for a in opencv] == [
            OpenCVResizeShortestEdge if isinstance(a, T.ResizeShortestEdge) else type(a)
            for a in detectron2s
        ]
    resize = next(a for a in opencv if isinstance(a, OpenCVResizeShortestEdge))
    assert resize.short_edge_length == tuple(cfg.INPUT.MIN_SIZE_TRAIN)
    assert resize.max_size == cfg.INPUT.MAX_SIZE_TRAIN


def test_training_draws_the_short_side_as_detectron2_does():
    image = _image(60, 90)
    for style, sizes in (("choice", (40, 50, 64)), ("range", (40, 64))):
        ours = OpenCVResizeShortestEdge(sizes, 1000, style)
        theirs = T.ResizeShortestEdge(sizes, 1000, style)
        for seed in range(8):
            np.random.seed(seed)
            out = ours.get_transform(image)
            np.random.seed(seed)
            reference = theirs.get_transform(image)
            # Same draw, so the same short side (the sizes here round alike in both rules).
            assert (out.new_h, out.new_w) == (reference.new_h, reference.new_w)
    assert isinstance(OpenCVResizeShortestEdge(0).get_transform(image), T.NoOpTransform)


def test_train_mapper_with_opencv_resizes_image_and_boxes_together(tmp_path):
    cfg = _cfg("opencv", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "200",
               "INPUT.RANDOM_FLIP", "none")  # fmt: skip
    image = _image(61, 83)
    path = str(tmp_path / "a.png")
    Image.fromarray(image[:, :, ::-1]).save(path)  # stored as RGB; the config reads RGB
    mapper = DatasetMapper(cfg, True, augmentations=build_train_augmentation(cfg))
    record = {
        "file_name": path, "height": 61, "width": 83, "image_id": 0,
        "annotations": [{"bbox": [10.0, 5.0, 40.0, 30.0], "bbox_mode": 0, "category_id": 1}],
    }  # fmt: skip
    out = mapper(record)
    new_h, new_w = _mmcv_size(61, 83, (200, 96))
    expected = cv2.resize(image[:, :, ::-1], (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    assert torch.equal(out["image"], torch.as_tensor(expected.transpose(2, 0, 1).copy()))
    boxes = out["instances"].gt_boxes.tensor[0].numpy()
    sx, sy = new_w / 83, new_h / 61
    np.testing.assert_allclose(boxes, [10 * sx, 5 * sy, 40 * sx, 30 * sy], rtol=1e-6)


def test_a_bad_backend_is_one_clear_error():
    cfg = _cfg("cv2")
    with pytest.raises(ResizeBackendError) as info:
        build_test_augmentation(cfg)
    assert isinstance(info.value, DCNv2Error)
    assert str(info.value) == "INPUT.DCNV2.RESIZE_BACKEND is 'cv2'; expected one of 'pil', 'opencv'"
    with pytest.raises(ResizeBackendError):
        build_train_augmentation(cfg)
