"""Turn a model's ``"parts"`` output into score-sorted numpy arrays and tie parts to GT objects."""
import dataclasses

import numpy as np
import torch
from pycocotools import mask as mask_util

OBJECT_ASSIGNMENTS = ("max_overlap", "object_index")
_FIELDS = ("pred_masks", "scores", "pred_clusters", "object_index", "object_classes")


def _numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@dataclasses.dataclass
class ImageParts:
    """Predicted parts of one image sorted by descending score (stable: ties keep model order,
    exactly as pycocotools' ``argsort(-score, kind="mergesort")``)."""

    masks: np.ndarray           # [N, H, W] bool
    scores: np.ndarray          # [N] float64
    clusters: np.ndarray        # [N] int64, -1 = none
    object_index: np.ndarray    # [N] int64, -1 = none
    object_classes: np.ndarray  # [N] int64, -1 = none

    def __len__(self):
        return len(self.scores)

    def take(self, index):
        return ImageParts(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


def parse_parts(output, height, width):
    """Validate ``output["parts"]`` (docs/formats.md) against the GT image size and sort it by score."""
    if "parts" not in output:
        raise KeyError("model output has no 'parts' Instances; see part_distill.evaluation's docstring")
    parts = output["parts"]
    missing = [f for f in _FIELDS if not parts.has(f)]
    if missing:
        raise KeyError(f"'parts' Instances lacks field(s) {missing}; required: {list(_FIELDS)}")
    masks = _numpy(parts.pred_masks)
    if masks.ndim != 3 or masks.shape[1:] != (height, width):
        raise ValueError(
            f"parts.pred_masks has shape {tuple(masks.shape)}, expected [N, {height}, {width}] "
            "(masks at the ground-truth image resolution)"
        )
    scores = _numpy(parts.scores).astype(np.float64)
    order = np.argsort(-scores, kind="mergesort")
    return ImageParts(
        masks.astype(bool, copy=False)[order],
        scores[order],
        _numpy(parts.pred_clusters).astype(np.int64)[order],
        _numpy(parts.object_index).astype(np.int64)[order],
        _numpy(parts.object_classes).astype(np.int64)[order],
    )


def encode_transposed(masks):
    """RLEs of the *transposed* masks [N, H, W] -> N RLEs of W x H, without copying.

    pycocotools wants column-major (H, W, N) data; a C-ordered [N, H, W] array read as (W, H, N) is
    exactly that layout for the transposed masks. IoUs and areas do not change under transposing
    both sides, so compare only with other ``encode_transposed`` RLEs."""
    if len(masks) == 0:
        return []
    masks = np.ascontiguousarray(masks)
    return mask_util.encode(masks.view(np.uint8).transpose(2, 1, 0))


def assign_to_objects(parts, object_masks, rule):
    """GT object row owning each part ([N] int64, -1 = none).

    ``max_overlap``: the GT object sharing most pixels with the part (ties: lower row; no shared
    pixel: none) - valid for any model. ``object_index``: the part's ``object_index`` taken as a row
    of the image's GT annotations (models run with ``MODEL.PART_DISTILL.OBJECTS = "gt"``).
    """
    n, num_obj = len(parts), len(object_masks)
    if rule == "object_index":
        idx = parts.object_index.copy()
        bad = idx >= num_obj
        if bad.any():
            raise ValueError(
                f"object_index {int(idx[bad].max())} >= {num_obj} GT objects; with "
                "TEST.PARTS.OBJECT_ASSIGNMENT='object_index' it must index the GT annotations"
            )
        idx[idx < 0] = -1
        return idx
    if rule != "max_overlap":
        raise ValueError(f"unknown object assignment {rule!r}; expected one of {OBJECT_ASSIGNMENTS}")
    if n == 0 or num_obj == 0:
        return np.full(n, -1, dtype=np.int64)
    part_rles = encode_transposed(parts.masks)
    # Crowd IoU is intersection / part area; run-length intersections beat dense masks by far.
    ratio = np.asarray(mask_util.iou(part_rles, encode_transposed(object_masks), [1] * num_obj)).reshape(n, num_obj)
    overlap = np.rint(ratio * mask_util.area(part_rles)[:, None]).astype(np.int64)
    best = overlap.argmax(axis=1)
    return np.where(overlap[np.arange(n), best] > 0, best, -1).astype(np.int64)
