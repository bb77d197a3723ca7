"""Class-agnostic AR@k of part masks, identical to pycocotools' COCOeval (segm, useCats=0,
maxDets=[k], areaRng all) but computed per image in ``process`` and reduced to counts.

Why per image: COCOeval matches each image independently and its recall is
``sum_images matched / sum_images #GT``, so an image's contribution is fully described by how many
GT parts are matched at each (IoU threshold, k). Greedy matching in score order has the prefix
property (decisions for the first k detections do not depend on later ones), so one pass over the
top max(k) detections gives every k.

Variants (all combinations are evaluated):
- mode ``overlap``: masks as predicted; ``non_overlap``: every pixel goes to the highest-scoring
  part covering it (ties: the part first in the stable score order), the others lose it.
- restriction ``none``; ``union``: each part is intersected with the union of the GT object masks;
  ``assigned``: intersected with the mask of its own GT object (``TEST.PARTS.OBJECT_ASSIGNMENT``),
  emptied when it has none. Restriction is applied before the non-overlap conversion.
Parts emptied by either step still occupy their top-k slot (as an empty detection would in COCOeval).
"""
from collections import OrderedDict

import numpy as np
from pycocotools import mask as mask_util

from detectron2.config import configurable

from .base import PartEvaluatorBase, write_tables
from .build import PARTS_EVALUATOR_REGISTRY
from .predictions import assign_to_objects, encode_transposed

# Built exactly as pycocotools' Params so threshold comparisons agree bit for bit.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
AR_MODES = ("overlap", "non_overlap")
UNMATCHED = np.iinfo(np.int64).max
RESTRICTIONS = ("none", "union", "assigned")


def greedy_match_ranks(ious, thresholds=IOU_THRESHOLDS):
    """For ``ious`` [D, G] (detections in score order), the rank of the detection matched to each GT
    at each threshold ([T, G], UNMATCHED if none), following COCOeval.evaluateImg: every detection in
    turn takes the still-free GT of highest IoU >= t (ties: the last such GT)."""
    num_det, num_gt = ious.shape
    ranks = np.full((len(thresholds), num_gt), UNMATCHED, dtype=np.int64)
    if num_det == 0 or num_gt == 0:
        return ranks
    eff = np.minimum(thresholds, 1 - 1e-10)[:, None]
    flipped = ious[:, ::-1]
    # A detection under the lowest threshold for every GT can never match; skip it.
    for d in np.nonzero((ious >= eff.min()).any(axis=1))[0]:
        free = ranks[:, ::-1] == UNMATCHED
        cand = (flipped[d][None, :] >= eff) & free
        hit = cand.any(axis=1)
        if not hit.any():
            continue
        last = num_gt - 1 - np.where(cand, flipped[d][None, :], -1.0).argmax(axis=1)
        ranks[np.nonzero(hit)[0], last[hit]] = d
    return ranks


def non_overlapping(masks):
    """Give every pixel to the first (highest-scoring) mask covering it."""
    out = np.empty_like(masks)
    claimed = np.zeros(masks.shape[1:], dtype=bool)
    # A sequential sweep touches each mask once; argmax over axis 0 would stride through memory.
    for i, m in enumerate(masks):
        np.greater(m, claimed, out=out[i])
        claimed |= m
    return out


def restrict(masks, gt, assignment, restriction):
    if restriction == "none":
        return masks
    if restriction == "union":
        return masks & gt.object_masks.any(axis=0)[None]
    if restriction == "assigned":
        if len(gt.object_masks) == 0:
            return np.zeros_like(masks)
        own = gt.object_masks[np.maximum(assignment, 0)] & (assignment >= 0)[:, None, None]
        return masks & own
    raise ValueError(f"unknown restriction {restriction!r}; expected one of {RESTRICTIONS}")


def variant_name(k, mode, restriction):
    return f"AR@{k}" + ("" if mode == "overlap" else "-nonoverlap") + (
        "" if restriction == "none" else f"-gtobj_{restriction}")


@PARTS_EVALUATOR_REGISTRY.register()
class PartAREvaluator(PartEvaluatorBase):
    """AR@k (in %) of class-agnostic part proposals for every (mode, restriction) variant."""

    needs_part_maps = False
    # Result key and table name (PartARReferenceEvaluator reuses _compute under its own).
    task = "parts_ar"
    notes = "IoU .50:.05:.95, class-agnostic, one-to-one greedy matching as COCOeval."

    @configurable
    def __init__(self, dataset_name=None, *, ks=(1, 10, 50, 100, 200), modes=("overlap",),
                 restrictions=("none",), object_assignment="max_overlap", **kwargs):
        super().__init__(dataset_name, **kwargs)
        self._ks = sorted({int(k) for k in ks})
        if not self._ks or self._ks[0] < 1:
            raise ValueError(f"AR k values must be >= 1, got {list(ks)}")
        for m in modes:
            if m not in AR_MODES:
                raise ValueError(f"unknown AR mode {m!r}; expected one of {AR_MODES}")
        for r in restrictions:
            if r not in RESTRICTIONS:
                raise ValueError(f"unknown TEST.PARTS.RESTRICT_TO_GT_OBJECT {r!r}; expected {RESTRICTIONS}")
        self._variants = [(m, r) for r in restrictions for m in modes]
        self._assignment_rule = object_assignment

    @classmethod
    def from_config(cls, cfg, dataset_name=None, output_dir=None, **kwargs):
        return dict(dataset_name=dataset_name, output_dir=output_dir, ks=cfg.TEST.PARTS.AR_KS,
                    modes=cfg.TEST.PARTS.AR_MODES, restrictions=cfg.TEST.PARTS.RESTRICT_TO_GT_OBJECT,
                    object_assignment=cfg.TEST.PARTS.OBJECT_ASSIGNMENT, **kwargs)

    def _process_image(self, image_id, gt, parts):
        parts = parts.take(slice(0, self._ks[-1]))  # top max(k) by score, as COCOeval's maxDets
        assignment = None
        if any(r == "assigned" for _, r in self._variants):
            assignment = assign_to_objects(parts, gt.object_masks, self._assignment_rule)
        ks = np.array(self._ks)
        counts = {}
        for mode, restriction in self._variants:
            masks = restrict(parts.masks, gt, assignment, restriction)
            if mode == "non_overlap":
                masks = non_overlapping(masks)
            if len(masks) and gt.num_parts:
                ious = mask_util.iou(encode_transposed(masks), gt.part_rles_t, [0] * gt.num_parts)
            else:
                ious = np.zeros((len(masks), gt.num_parts))
            ranks = greedy_match_ranks(np.asarray(ious, dtype=np.float64).reshape(len(masks), gt.num_parts))
            # matched[t, j]: GT parts matched within the top ks[j] detections at threshold t.
            counts[(mode, restriction)] = (ranks[:, :, None] < ks[None, None, :]).sum(axis=1)
        return {"num_gt": gt.num_parts, "counts": counts}

    def _denominator(self, records, variant):
        """GT parts that a variant's recall divides by (all of them here)."""
        return sum(r["num_gt"] for r in records)

    def _compute(self, records):
        num_gt = sum(r["num_gt"] for r in records)
        results = OrderedDict()
        rows = []
        for mode, restriction in self._variants:
            matched = sum((r["counts"][(mode, restriction)] for r in records),
                          np.zeros((len(IOU_THRESHOLDS), len(self._ks)), dtype=np.int64))
            denom = self._denominator(records, (mode, restriction))
            recall = matched.mean(axis=0) / denom * 100 if denom else np.full(len(self._ks), np.nan)
            for k, value in zip(self._ks, recall):
                results[variant_name(k, mode, restriction)] = float(value)
            rows.append([mode, restriction, *(float(v) for v in recall)])
        results["num_images"] = float(len(records))
        results["num_gt_parts"] = float(num_gt)
        write_tables(self._output_dir, self.task, ["mode", "restrict_to_gt_object", *(f"AR@{k}" for k in self._ks)],
                     rows, [f"{len(records)} images, {num_gt} GT parts; {self.notes}"])
        return OrderedDict([(self.task, results)])
