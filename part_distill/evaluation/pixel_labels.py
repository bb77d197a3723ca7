"""Per-object pixel contingency between predicted part labels and GT part labels.

For every GT object, each of its pixels gets
- a GT label: the GT part class covering it, or -1 when none does (dropped when
  ``unlabeled == "ignore"``, kept as its own label when ``"label"``);
- a predicted label ``(object_class, cluster)`` of the highest-scoring predicted part that is
  assigned to this object (see ``assign_to_objects``) and covers the pixel, or ``(-1, -1)``
  ("none") when no such part covers it. Parts whose ``pred_clusters`` is -1 carry no cluster and
  are dropped before this step (they are counted, see ``count_unclustered``).
Pixels of overlapping GT objects are counted once per object. Only counts are kept, so the
result is exact and small enough to gather across ranks.
"""
import numpy as np

from .ground_truth import UNLABELED_GT_MODES

# Columns of a contingency row.
OBJ_CLASS, PRED_CLASS, PRED_CLUSTER, GT_PART, COUNT = range(5)


def object_contingency(gt, parts, assignment, unlabeled="ignore"):
    """Int64 rows ``[object_class, pred_object_class, pred_cluster, gt_part, pixel_count]``, one per
    distinct (GT object, predicted label, GT label) of the image (same object class rows may repeat)."""
    if unlabeled not in UNLABELED_GT_MODES:
        raise ValueError(f"TEST.PARTS.UNLABELED_GT={unlabeled!r}; expected one of {UNLABELED_GT_MODES}")
    rows = []
    clustered = parts.clusters >= 0
    for o, full_mask in enumerate(gt.object_masks):
        if not full_mask.any():
            continue
        # Work inside the object's box: gathering pixels from every part mask dominates the cost.
        ys, xs = np.nonzero(full_mask.any(axis=1))[0], np.nonzero(full_mask.any(axis=0))[0]
        box = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
        obj_mask = full_mask[box]
        gt_labels = gt.part_label_maps[o][box][obj_mask]
        pixels = obj_mask
        if unlabeled == "ignore":
            keep = gt_labels >= 0
            pixels = obj_mask.copy()
            pixels[obj_mask] = keep
            gt_labels = gt_labels[keep]
        if len(gt_labels) == 0:
            continue
        sel = np.nonzero((assignment == o) & clustered)[0]  # still in descending score order
        pred_index = np.full(len(gt_labels), len(sel), dtype=np.int64)  # len(sel) = "none"
        # Paint from lowest to highest score so the best-scoring covering part ends on top.
        for j in range(len(sel) - 1, -1, -1):
            pred_index[parts.masks[sel[j]][box][pixels]] = j
        gt_values, gt_index = np.unique(gt_labels, return_inverse=True)
        key = pred_index * len(gt_values) + gt_index.reshape(-1)
        counts = np.bincount(key, minlength=(len(sel) + 1) * len(gt_values))
        nz = np.nonzero(counts)[0]
        p_idx, g_idx = np.divmod(nz, len(gt_values))
        pred_class = np.append(parts.object_classes[sel], -1)[p_idx]
        pred_cluster = np.append(parts.clusters[sel], -1)[p_idx]
        rows.append(np.stack([np.full(len(nz), gt.object_classes[o]), pred_class, pred_cluster,
                              gt_values[g_idx], counts[nz]], axis=1))
    return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 5), dtype=np.int64)


def count_unclustered(parts):
    return int(np.count_nonzero(parts.clusters < 0))


def class_contingency(rows):
    """Collapse rows of one object class into a dense table ``[pred labels, gt labels]``.

    Returns (table int64, pred_labels [(class, cluster)...], gt_labels [part ids...])."""
    pred_keys, pred_inv = np.unique(rows[:, [PRED_CLASS, PRED_CLUSTER]], axis=0, return_inverse=True)
    gt_keys, gt_inv = np.unique(rows[:, GT_PART], return_inverse=True)
    table = np.zeros((len(pred_keys), len(gt_keys)), dtype=np.int64)
    np.add.at(table, (pred_inv.reshape(-1), gt_inv.reshape(-1)), rows[:, COUNT])
    return table, [tuple(int(v) for v in k) for k in pred_keys], [int(v) for v in gt_keys]
