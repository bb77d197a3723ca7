"""A tensor-in / tensors-out view of a PartDistillationModel that tracing can capture.

Only the network is exported: encoder E, instance decoder D^o, part decoder D^p and, when the model
holds a fitted ``ranker``, the class-specific prototype probabilities of every part query for every
object class. Post-processing (top-k, thresholds, Eq. 1 owner assignment, slot slicing, re-ranking
by the owner's class) stays in Python (``modeling.meta_arch.postprocess``): it produces a
data-dependent number of masks at the caller's resolution, which traced graphs would freeze to the
sizes seen at export time, and it is cheap next to the network.
"""
import torch
from torch import nn

__all__ = ["OUTPUT_NAMES", "TraceablePartModel"]

OUTPUT_NAMES = ("object_logits", "object_masks", "part_logits", "part_masks", "part_features")
RANKER_OUTPUT = "ranker_probs"


class TraceablePartModel(nn.Module):
    """``forward(image)``: normalised image [B, 3, H, W] (H, W multiples of the model's
    size_divisibility) -> tuple of ``output_names`` tensors:

    object_logits [B, Qo, K+1], object_masks [B, Qo, H/4, W/4] (logits), part_logits [B, Qp, C+1],
    part_masks [B, Qp, H/4, W/4] (logits), part_features [B, Qp, D] and, with a fitted ranker,
    ranker_probs [B, Qp, num_object_classes, k] (Eq. 2 as if each class owned the part).
    """

    def __init__(self, model):
        super().__init__()
        if not hasattr(model, "part_predictor"):
            raise ValueError(f"{type(model).__name__} has no part decoder; export needs PartDistillationModel")
        if getattr(model, "object_crop", None) is not None:
            # The graph would need the owner objects as inputs and a data-dependent number of crops.
            raise ValueError("export of an object-crop part model is not supported: export with "
                             "MODEL.PART_DISTILL.OBJECT_CROP.ENABLED False (a whole-image model)")
        self.model = model
        ranker = getattr(model, "ranker", None)
        self.with_ranker = ranker is not None and bool(ranker.fitted_classes.any())
        self.output_names = OUTPUT_NAMES + ((RANKER_OUTPUT,) if self.with_ranker else ())

    def normalize(self, image_uint8):
        """[B, 3, H, W] uint8/float in INPUT.FORMAT order -> the normalised input of ``forward``."""
        return (image_uint8.float() - self.model.pixel_mean) / self.model.pixel_std

    def forward(self, image):
        m = self.model
        feats = m.encode_for_parts(image)
        obj = m.predict_objects(feats)
        part = m.predict_parts(feats)
        out = (obj["pred_logits"], obj["pred_masks"], part["pred_logits"], part["pred_masks"],
               part["query_features"])
        if self.with_ranker:
            out = out + (self._ranker_probs(part["query_features"]),)
        return out

    def _ranker_probs(self, features):
        # The owner's class is only known after Eq. 1, so every class is scored; Python picks one.
        ranker = self.model.ranker
        b, q, d = features.shape
        c = ranker.num_object_classes
        flat = features.reshape(b * q, 1, d).expand(b * q, c, d).reshape(b * q * c, d)
        classes = torch.arange(c, device=features.device).repeat(b * q)
        probs, _, _ = ranker(flat, classes)
        return probs.reshape(b, q, c, -1)
