"""Single-image inference for a part model, in the manner of detectron2's ``DefaultPredictor``.

``PartPredictor(cfg)`` builds the model, loads ``cfg.MODEL.WEIGHTS`` (an empty string keeps the
random initialisation, useful only to exercise the code path) and maps one BGR uint8 image to the
model's output (docs/formats.md). Objects that own the parts come from the model's instance
decoder (``objects="predicted"``), or are given by the caller (``"gt"``; ``"whole-image"`` is the
special case of one object covering the whole image): both run the model with
``MODEL.PART_DISTILL.OBJECTS = "gt"`` and hand the masks over as ``instances``.
"""
import logging

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Instances

from ..modeling.checkpoint import PartDistillCheckpointer

__all__ = ["OBJECT_MODES", "PartPredictor", "whole_image_objects"]

logger = logging.getLogger(__name__)

OBJECT_MODES = ("predicted", "gt", "whole-image")


def whole_image_objects(height, width, object_class=0):
    """The whole image as the single owner object: (masks Bool[1, H, W], classes Long[1])."""
    return np.ones((1, height, width), bool), np.array([object_class], np.int64)


class PartPredictor:
    """Runs a ``PartDistillationModel`` on one image at a time (eval mode, no grad).

    Args:
        cfg: a config whose MODEL.META_ARCHITECTURE produces ``"parts"`` (PartDistillationModel).
        objects: one of ``OBJECT_MODES``; for "gt" / "whole-image" every call must pass ``objects``.
    """

    def __init__(self, cfg, objects="predicted"):
        if objects not in OBJECT_MODES:
            raise ValueError(f"objects must be one of {OBJECT_MODES}, got {objects!r}")
        self.cfg = cfg.clone()
        self.cfg.defrost()
        # Caller-provided owners go through the model's ground-truth-objects path (Eq. 1 unchanged).
        self.cfg.MODEL.PART_DISTILL.OBJECTS = "predicted" if objects == "predicted" else "gt"
        self.cfg.freeze()
        self.objects = objects
        self.model = build_model(self.cfg)
        if not hasattr(self.model, "part_predictor"):
            raise ValueError(f"MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE} predicts no parts; "
                             "the demo needs PartDistillationModel")
        self.model.eval()
        if cfg.MODEL.WEIGHTS:
            PartDistillCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        else:
            logger.warning("MODEL.WEIGHTS is empty: the part model is randomly initialised, its "
                           "predictions are meaningless")
        self.aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be RGB or BGR, got {self.input_format!r}")

    @torch.no_grad()
    def __call__(self, image_bgr, objects=None):
        """
        Args:
            image_bgr: uint8 array [H, W, 3] in BGR order (as ``read_image`` returns by default).
            objects: ``(masks Bool[M, H, W], classes Long[M])`` owner objects at image resolution;
                required unless the predictor was built with ``objects="predicted"``.
        Returns:
            the model's output dict for this image (``"instances"``, ``"parts"``) at [H, W].
        """
        height, width = image_bgr.shape[:2]
        image = image_bgr[:, :, ::-1] if self.input_format == "RGB" else image_bgr
        resized = self.aug.get_transform(image).apply_image(image)
        tensor = torch.from_numpy(np.array(resized.transpose(2, 0, 1)))  # owned, writable copy
        inputs = {"image": tensor, "height": height, "width": width}
        if self.objects != "predicted":
            if objects is None:
                raise ValueError(f"objects={self.objects!r}: pass the owner objects (masks, classes)")
            masks, classes = objects
            inst = Instances((height, width))
            inst.gt_masks = torch.as_tensor(np.asarray(masks, bool))
            inst.gt_classes = torch.as_tensor(np.asarray(classes), dtype=torch.int64)
            inputs["instances"] = inst
        return self.model([inputs])[0]
