"""``Predictor``: a detector on single images, preprocessed as evaluation does."""

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from ..checkpoint import build_checkpointer
from ..data import build_test_augmentation

__all__ = ["Predictor"]


class Predictor:
    """detectron2's ``DefaultPredictor`` with this package's test-time augmentation
    (:func:`dcnv2.data.build_test_augmentation`) and safe weight loading of ``MODEL.WEIGHTS``
    (:func:`dcnv2.checkpoint.build_checkpointer`); ``metadata`` is the first test dataset's.
    """

    def __init__(self, cfg):
        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR', got {cfg.INPUT.FORMAT!r}")
        self.cfg = cfg.clone()  # the model may modify its config
        self.augmentation = T.AugmentationList(build_test_augmentation(self.cfg))
        self.model = build_model(self.cfg)
        self.model.eval()
        if len(cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        build_checkpointer(self.cfg, self.model).load(cfg.MODEL.WEIGHTS)
        self.input_format = cfg.INPUT.FORMAT

    def __call__(self, original_image: np.ndarray) -> dict:
        """The model's output for ``original_image``, (H, W, 3) uint8 in BGR order (``instances``
        in its coordinates)."""
        with torch.no_grad():
            if self.input_format == "RGB":
                original_image = original_image[:, :, ::-1]
            height, width = original_image.shape[:2]
            aug_input = T.AugInput(original_image)
            self.augmentation(aug_input)
            image = torch.as_tensor(aug_input.image.astype("float32").transpose(2, 0, 1))
            image = image.to(self.cfg.MODEL.DEVICE)
            return self.model([{"image": image, "height": height, "width": width}])[0]
