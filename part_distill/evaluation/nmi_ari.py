"""NMI and ARI between predicted part labels and GT part labels, per object class (paper Table 2,
protocol of Choudhury et al. 2021).

Foreground only: the pixels inside GT object masks (with ``UNLABELED_GT="ignore"`` only those that
a GT part labels). Object pixels that no predicted part covers form their own predicted label
("none"), so missing a part is penalised rather than ignored. Both scores are computed once per
object class from the pixel contingency table summed over every image of the dataset, which is
exactly scikit-learn's ``normalized_mutual_info_score`` (arithmetic normalisation) and
``adjusted_rand_score`` on the concatenated pixel labels of that class.
"""
import math
from collections import OrderedDict

import numpy as np
from sklearn.metrics import mutual_info_score

from detectron2.config import configurable

from .base import PartEvaluatorBase, write_tables
from .build import PARTS_EVALUATOR_REGISTRY
from .pixel_labels import OBJ_CLASS, class_contingency, count_unclustered, object_contingency
from .predictions import assign_to_objects


def _entropy(counts):
    counts = counts[counts > 0].astype(np.float64)
    if counts.size <= 1:
        return 0.0
    total = counts.sum()
    return float(-np.sum((counts / total) * (np.log(counts) - math.log(total))))


def nmi_from_contingency(table):
    """sklearn's normalized_mutual_info_score(average_method="arithmetic") from a contingency table."""
    table = np.asarray(table, dtype=np.int64)
    rows, cols = (table.sum(axis=1) > 0).sum(), (table.sum(axis=0) > 0).sum()
    if rows == cols == 1 or rows == cols == 0:
        return 1.0  # both labellings constant (or empty): sklearn calls that a perfect match
    mi = mutual_info_score(None, None, contingency=table)
    if mi == 0:
        return 0.0
    return float(mi / ((_entropy(table.sum(axis=1)) + _entropy(table.sum(axis=0))) / 2))


def ari_from_contingency(table):
    """sklearn's adjusted_rand_score from a contingency table, via exact pair counts (Python ints)."""
    table = np.asarray(table, dtype=np.int64)
    n = int(table.sum())
    sum_sq = int((table.astype(object) ** 2).sum())
    rows = [int(v) for v in table.sum(axis=1)]
    cols = [int(v) for v in table.sum(axis=0)]
    tp = sum_sq - n
    fp = sum(v * v for v in cols) - sum_sq  # pairs together in prediction only (sklearn's C[0, 1])
    fn = sum(v * v for v in rows) - sum_sq
    tn = n * n - fp - fn - sum_sq
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


@PARTS_EVALUATOR_REGISTRY.register()
class PartNMIARIEvaluator(PartEvaluatorBase):
    """NMI / ARI (in %) per object class and their mean over object classes."""

    @configurable
    def __init__(self, dataset_name=None, *, object_assignment="max_overlap", unlabeled_gt="ignore", **kwargs):
        super().__init__(dataset_name, **kwargs)
        self._assignment_rule = object_assignment
        self._unlabeled = unlabeled_gt

    @classmethod
    def from_config(cls, cfg, dataset_name=None, output_dir=None, **kwargs):
        return dict(dataset_name=dataset_name, output_dir=output_dir,
                    object_assignment=cfg.TEST.PARTS.OBJECT_ASSIGNMENT,
                    unlabeled_gt=cfg.TEST.PARTS.UNLABELED_GT, **kwargs)

    def _process_image(self, image_id, gt, parts):
        assignment = assign_to_objects(parts, gt.object_masks, self._assignment_rule)
        return {"rows": object_contingency(gt, parts, assignment, self._unlabeled),
                "unclustered": count_unclustered(parts)}

    def _compute(self, records):
        rows = np.concatenate([r["rows"] for r in records]) if records else np.zeros((0, 5), np.int64)
        per_class = OrderedDict()
        for c in np.unique(rows[:, OBJ_CLASS]):
            table, _, _ = class_contingency(rows[rows[:, OBJ_CLASS] == c])
            per_class[int(c)] = (100 * nmi_from_contingency(table), 100 * ari_from_contingency(table))
        results = OrderedDict()
        names = [self._gt.object_class_name(c) for c in per_class]
        mean_nmi = float(np.mean([v[0] for v in per_class.values()])) if per_class else float("nan")
        mean_ari = float(np.mean([v[1] for v in per_class.values()])) if per_class else float("nan")
        results["NMI"], results["ARI"] = mean_nmi, mean_ari
        for name, (nmi, ari) in zip(names, per_class.values()):
            results[f"NMI-{name}"] = nmi
            results[f"ARI-{name}"] = ari
        results["num_parts_without_cluster"] = float(sum(r["unclustered"] for r in records))
        write_tables(
            self._output_dir, "parts_nmi_ari", ["metric", *names, "mean"],
            [["NMI", *(v[0] for v in per_class.values()), mean_nmi],
             ["ARI", *(v[1] for v in per_class.values()), mean_ari]],
            [f"{len(records)} images; foreground = pixels inside GT objects (unlabeled GT: {self._unlabeled}); "
             "uncovered pixels form their own predicted label."])
        return OrderedDict(parts_nmi_ari=results)
