"""mIoU of unsupervised part clusters after associating each cluster with a GT part class.

Pixels and labels are those of ``pixel_labels`` (pixels inside GT objects; a pixel goes to the
highest-scoring predicted part of its object; uncovered pixels are "none").

1. Split: an image is in the *match* split when ``md5(f"{seed}:{image_id}")`` maps below
   ``match_fraction``; all other images form the *eval* split. With ``association_file`` every image
   is evaluated with an association computed on another dataset. With ``match_fraction == 0`` (or a
   split that leaves either side empty) the association is made on the evaluated images themselves:
   the metric dict then has ``separate_split = 0`` and the report says so.
2. Association, per object class, on the match split: ``majority`` maps each predicted label
   ``(object_class, cluster)`` to the GT part class it overlaps most (many-to-one, ties to the lower
   part id); ``hungarian`` maps one-to-one maximising total overlap (scipy's linear_sum_assignment).
   Labels with no overlap with any labelled GT part, and labels never seen on the match split
   ("a cluster never matched"), stay unassociated, and so do "none" pixels.
   ``identity`` is for supervised heads whose ``pred_clusters`` already are GT part class ids (the
   few-shot stage): ``(object_class, p)`` maps to part ``p`` when ``p`` is one of the object class's
   part classes (any ``p >= 0`` when the metadata lists none). Nothing is fitted, so there is no
   match split: every image is evaluated (``separate_split = 1``).
3. IoU on the eval split, per object class c and part class p of c:
   ``TP / (TP + FP + FN)`` where a pixel is predicted p when its label is associated with p;
   unassociated pixels are wrong for every GT part. Part classes with empty union are skipped.
   mIoU(c) = mean over its part classes; ``mIoU`` = mean over object classes.
The association is always written to ``<output_dir>/parts_association.json`` for reuse.
"""
import hashlib
import json
import logging
from collections import OrderedDict

import numpy as np
from scipy.optimize import linear_sum_assignment

from detectron2.config import configurable

from ..utils.io import atomic_write_json
from .base import PartEvaluatorBase, write_tables
from .build import PARTS_EVALUATOR_REGISTRY
from .pixel_labels import OBJ_CLASS, class_contingency, count_unclustered, object_contingency
from .predictions import assign_to_objects

logger = logging.getLogger(__name__)
ASSOCIATIONS = ("majority", "hungarian", "identity")
# Split description of the identity association (nothing fitted, so nothing is held out).
IDENTITY_SPLIT = "identity association: predicted part class = cluster id, no match split (all images evaluated)"


def in_match_split(image_id, fraction, seed=0):
    """Deterministic (process- and rank-independent) draw of the match split by image id."""
    digest = hashlib.md5(f"{seed}:{image_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") / 2.0 ** 64 < fraction


def associate(table, pred_labels, gt_labels, method="majority", part_ids=None):
    """{pred label: GT part id} from a match-split contingency table (GT label -1 never a target).

    ``part_ids``: the object class's part classes, read by ``identity`` only (None = no restriction).
    """
    if method not in ASSOCIATIONS:
        raise ValueError(f"unknown TEST.PARTS.ASSOCIATION {method!r}; expected one of {ASSOCIATIONS}")
    if method == "identity":
        allowed = None if part_ids is None else set(part_ids)
        return {p: p[1] for p in pred_labels if p[1] >= 0 and (allowed is None or p[1] in allowed)}
    cols = [j for j, g in enumerate(gt_labels) if g >= 0]
    rows = [i for i, p in enumerate(pred_labels) if p[1] >= 0]  # (-1, -1) is "none"
    if not cols or not rows:
        return {}
    sub = table[np.ix_(rows, cols)]
    if method == "majority":
        pairs = [(i, int(sub[i].argmax())) for i in range(len(rows))]
    else:
        pairs = zip(*linear_sum_assignment(sub, maximize=True))
    return {pred_labels[rows[i]]: gt_labels[cols[j]] for i, j in pairs if sub[i, j] > 0}


def class_ious(rows, mapping, part_ids):
    """{part id: IoU} on eval-split rows of one object class under ``mapping``."""
    tp, fp, fn = {}, {}, {}
    for _, pc, cl, g, n in rows.tolist():
        p = mapping.get((pc, cl), -2)
        if p == g:
            tp[g] = tp.get(g, 0) + n
            continue
        if p >= 0:
            fp[p] = fp.get(p, 0) + n
        if g >= 0:
            fn[g] = fn.get(g, 0) + n
    out = {}
    for p in sorted(set(part_ids) | set(tp) | set(fp) | set(fn)):
        union = tp.get(p, 0) + fp.get(p, 0) + fn.get(p, 0)
        if union > 0:
            out[p] = tp.get(p, 0) / union
    return out


@PARTS_EVALUATOR_REGISTRY.register()
class PartMIoUEvaluator(PartEvaluatorBase):
    """mIoU (in %) per object class and mean, with cluster association on a separate match split."""

    @configurable
    def __init__(self, dataset_name=None, *, association="majority", match_fraction=0.5, match_seed=0,
                 association_file="", object_assignment="max_overlap", unlabeled_gt="ignore", **kwargs):
        super().__init__(dataset_name, **kwargs)
        if association not in ASSOCIATIONS:
            raise ValueError(f"unknown TEST.PARTS.ASSOCIATION {association!r}; expected one of {ASSOCIATIONS}")
        if not 0.0 <= match_fraction < 1.0:
            raise ValueError(f"TEST.PARTS.MATCH_SPLIT_FRACTION must be in [0, 1), got {match_fraction}")
        self._association = association
        self._fraction = float(match_fraction)
        self._seed = match_seed
        self._association_file = association_file
        self._assignment_rule = object_assignment
        self._unlabeled = unlabeled_gt

    @classmethod
    def from_config(cls, cfg, dataset_name=None, output_dir=None, **kwargs):
        p = cfg.TEST.PARTS
        return dict(dataset_name=dataset_name, output_dir=output_dir, association=p.ASSOCIATION,
                    match_fraction=p.MATCH_SPLIT_FRACTION, match_seed=p.MATCH_SPLIT_SEED,
                    association_file=p.ASSOCIATION_FILE, object_assignment=p.OBJECT_ASSIGNMENT,
                    unlabeled_gt=p.UNLABELED_GT, **kwargs)

    def _process_image(self, image_id, gt, parts):
        assignment = assign_to_objects(parts, gt.object_masks, self._assignment_rule)
        return {"image_id": image_id, "rows": object_contingency(gt, parts, assignment, self._unlabeled),
                "unclustered": count_unclustered(parts)}

    def _load_association(self):
        try:
            with open(self._association_file) as f:
                data = json.load(f)
        except OSError as e:
            raise FileNotFoundError(f"TEST.PARTS.ASSOCIATION_FILE={self._association_file!r} cannot be read: {e}")
        return {int(c): {(int(a), int(b)): int(p) for a, b, p in pairs} for c, pairs in data["classes"].items()}

    def _split(self, records):
        """(match records, eval records, separate?, how the split was made)."""
        if self._association_file:
            return None, records, True, f"association from {self._association_file}"
        if self._fraction > 0:
            flags = [in_match_split(r["image_id"], self._fraction, self._seed) for r in records]
            match = [r for r, f in zip(records, flags) if f]
            evals = [r for r, f in zip(records, flags) if not f]
            if match and evals:
                return match, evals, True, (f"match split: {len(match)} images, eval split: {len(evals)} "
                                            f"images (fraction {self._fraction}, seed {self._seed})")
            logger.warning(f"match split fraction {self._fraction} leaves one side empty on {len(records)} "
                           "images; associating on the evaluated images themselves")
        return records, records, False, (
            "NO SEPARATE SPLIT: clusters were associated on the same images they are evaluated on "
            "(optimistic).")

    def _compute(self, records):
        identity = self._association == "identity"
        match, evals, separate, how = (records, records, True, IDENTITY_SPLIT) if identity else self._split(records)
        stack = lambda rs: np.concatenate([r["rows"] for r in rs]) if rs else np.zeros((0, 5), np.int64)  # noqa
        eval_rows = stack(evals)
        if match is None:
            mapping = self._load_association()
        else:
            match_rows = stack(match)
            mapping = {}
            for c in np.unique(match_rows[:, OBJ_CLASS]):
                mapping[int(c)] = associate(*class_contingency(match_rows[match_rows[:, OBJ_CLASS] == c]),
                                            method=self._association,
                                            part_ids=self._gt.object_part_classes.get(int(c)))
            if self._output_dir:
                atomic_write_json(f"{self._output_dir}/parts_association.json", {
                    "association": self._association, "dataset": self._dataset_name, "split": how,
                    "classes": {str(c): [[a, b, p] for (a, b), p in sorted(m.items())] for c, m in mapping.items()},
                }, indent=1)
        results = OrderedDict()
        table = []
        for c in np.unique(eval_rows[:, OBJ_CLASS]):
            c = int(c)
            ious = class_ious(eval_rows[eval_rows[:, OBJ_CLASS] == c], mapping.get(c, {}),
                              self._gt.object_part_classes.get(c, []))
            if ious:
                name = self._gt.object_class_name(c)
                table.append([name, 100 * float(np.mean(list(ious.values()))), len(ious)])
        results["mIoU"] = float(np.mean([t[1] for t in table])) if table else float("nan")
        for name, value, _ in table:
            results[f"mIoU-{name}"] = value
        results["separate_split"] = float(separate)
        results["num_eval_images"] = float(len(evals))
        results["num_parts_without_cluster"] = float(sum(r["unclustered"] for r in records))
        if not separate:
            logger.warning("parts mIoU: " + how)
        write_tables(self._output_dir, "parts_miou", ["object class", "mIoU", "#part classes"],
                     table + [["mean", results["mIoU"], ""]],
                     [f"association: {self._association}; {how}"])
        return OrderedDict(parts_miou=results)
