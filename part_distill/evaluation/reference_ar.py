"""The reference implementation's AR@k (facebookresearch/PartDistillation), for comparing with its
published numbers like for like. Not a default: add ``"PartARReferenceEvaluator"`` to
``TEST.PARTS.EVALUATORS``. Side by side with ours (``PartAREvaluator``) in docs/evaluation.md.

Per image, for every (mode, restriction) variant of TEST.PARTS.AR_MODES x RESTRICT_TO_GT_OBJECT:

1. GT parts: with ``TEST.PARTS.REFERENCE_AR_MERGE_SAME_CLASS`` the parts of one class within one
   object become one GT part (from the object's part label map: pixels of that class inside the object).
2. Proposals are transformed as in ours (restriction, then non-overlap), then every proposal whose best
   IoU with any GT part is ``<= TEST.PARTS.REFERENCE_AR_MIN_IOU`` (0.001) is dropped -- before the top k.
3. The top k survivors are matched to GT parts by repeatedly taking the (proposal, GT) pair of highest
   IoU and removing both (detectron2's box-proposal recall, not COCOeval's score-ordered greedy); a GT
   part is recalled at threshold t when its recorded IoU is >= t.

AR@k = mean over t in .50:.05:.95 of recalled / GT parts, summed over images; as in the reference, an
image with no proposal left (or no GT part) does not count its GT parts at all. The published
numbers clip proposals to the union of GT objects: read the ``-gtobj_union`` (overlap) row.
"""
import numpy as np
from pycocotools import mask as mask_util

from detectron2.config import configurable

from .average_recall import IOU_THRESHOLDS, PartAREvaluator, non_overlapping, restrict
from .build import PARTS_EVALUATOR_REGISTRY
from .predictions import assign_to_objects, encode_transposed

__all__ = ["PartARReferenceEvaluator", "max_overlap_matching", "merged_part_masks"]


def merged_part_masks(gt):
    """[P, H, W] one mask per (object, part class) present in the objects' part label maps."""
    masks = [lm == c for lm in gt.part_label_maps for c in np.unique(lm[lm >= 0])]
    return np.stack(masks) if masks else np.zeros((0, gt.height, gt.width), dtype=bool)


def max_overlap_matching(ious):
    """IoU recorded for each GT column of ``ious`` [D, G]: min(D, G) times, the highest remaining pair
    (first in row-major order on ties) is recorded and its row and column removed; unmatched GT get 0."""
    ious = np.array(ious, dtype=np.float64, copy=True).reshape(ious.shape)
    recorded = np.zeros(ious.shape[1])
    for _ in range(min(ious.shape)):
        d, g = np.unravel_index(np.argmax(ious), ious.shape)
        if ious[d, g] < 0:
            break
        recorded[g] = ious[d, g]
        ious[d, :] = -1
        ious[:, g] = -1
    return recorded


def _ious(masks, gt_rles, num_gt):
    if len(masks) and num_gt:
        return np.asarray(mask_util.iou(encode_transposed(masks), gt_rles, [0] * num_gt),
                          dtype=np.float64).reshape(len(masks), num_gt)
    return np.zeros((len(masks), num_gt))


@PARTS_EVALUATOR_REGISTRY.register()
class PartARReferenceEvaluator(PartAREvaluator):
    """AR@k (in %) under the reference's protocol (module docstring); results under ``parts_ar_reference``."""

    needs_part_maps = True
    task = "parts_ar_reference"
    notes = ("the reference's protocol: same-class parts of an object merged, proposals with best GT-part IoU "
             "<= min_iou dropped before top-k, max-overlap matching (docs/evaluation.md).")

    @configurable
    def __init__(self, dataset_name=None, *, min_iou=0.001, merge_same_class=True, **kwargs):
        super().__init__(dataset_name, **kwargs)
        self._min_iou = float(min_iou)
        self._merge = bool(merge_same_class)

    @classmethod
    def from_config(cls, cfg, dataset_name=None, output_dir=None, **kwargs):
        ret = PartAREvaluator.from_config(cfg, dataset_name, output_dir, **kwargs)
        ret.update(min_iou=cfg.TEST.PARTS.REFERENCE_AR_MIN_IOU,
                   merge_same_class=cfg.TEST.PARTS.REFERENCE_AR_MERGE_SAME_CLASS)
        return ret

    def _process_image(self, image_id, gt, parts):
        if self._merge:
            gt_masks = merged_part_masks(gt)
            gt_rles, num_gt = (encode_transposed(gt_masks) if len(gt_masks) else []), len(gt_masks)
        else:
            gt_rles, num_gt = gt.part_rles_t, gt.num_parts
        assignment = None
        if any(r == "assigned" for _, r in self._variants):
            assignment = assign_to_objects(parts, gt.object_masks, self._assignment_rule)
        counts, counted = {}, {}
        for mode, restriction in self._variants:
            masks = restrict(parts.masks, gt, assignment, restriction)
            if mode == "non_overlap":
                masks = non_overlapping(masks)
            ious = _ious(masks, gt_rles, num_gt)
            kept = ious[ious.max(axis=1, initial=0.0) > self._min_iou] if num_gt else ious[:0]
            # As the reference, an image left without proposals does not count its GT parts.
            counted[(mode, restriction)] = num_gt if len(kept) else 0
            per_k = [max_overlap_matching(kept[:k]) for k in self._ks]
            counts[(mode, restriction)] = np.stack(
                [(rec[None, :] >= IOU_THRESHOLDS[:, None]).sum(axis=1) for rec in per_k], axis=1)
        return {"num_gt": num_gt, "counts": counts, "num_gt_counted": counted}

    def _denominator(self, records, variant):
        return sum(r["num_gt_counted"][variant] for r in records)
