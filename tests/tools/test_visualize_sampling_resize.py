"""``tools/visualize_sampling.py`` (``dcnv2.tools.visualize_sampling.sample_image``) runs the
model on the image resized as evaluation resizes it: OpenCV with
``INPUT.DCNV2.RESIZE_BACKEND opencv``."""

import cv2
import numpy as np
from PIL import Image

from dcnv2.tools.cli import setup_cfg
from dcnv2.tools.demo import DemoRunner
from dcnv2.tools.visualize_sampling import sample_image

OPTS = ["MODEL.WEIGHTS", "", "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128"]


def test_sample_image_uses_the_configured_resize():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:75, 0:113]
    smooth = 127 + 60 * np.sin(x / 5.0)[..., None] * np.cos(y / 4.0)[..., None]
    image_bgr = np.clip(smooth + rng.normal(0, 25, (75, 113, 3)), 0, 255).astype(np.uint8)
    model = DemoRunner(setup_cfg("faster_rcnn_R50_mdconv_FPN_1x.yaml", OPTS)).predictor.model
    results = {}
    for backend in ("pil", "opencv"):
        cfg = setup_cfg(
            "faster_rcnn_R50_mdconv_FPN_1x.yaml", OPTS + ["INPUT.DCNV2.RESIZE_BACKEND", backend]
        )
        results[backend] = sample_image(model, cfg, image_bgr, points_xy=[(50.0, 30.0)])
    # mmcv's size rule: factor min(128 / 113, 96 / 75) = 1.1327...; 75 -> 85, 113 -> 128.
    expected = cv2.resize(image_bgr, (128, 85), interpolation=cv2.INTER_LINEAR)[:, :, ::-1]
    assert np.array_equal(results["opencv"]["image_rgb"], expected)
    pil = np.asarray(Image.fromarray(image_bgr).resize((128, 85), Image.BILINEAR))[:, :, ::-1]
    assert np.array_equal(results["pil"]["image_rgb"], pil)
    assert (pil != expected).mean() > 0.05
