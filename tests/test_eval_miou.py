"""mIoU with cluster association against a brute-force computation on per-pixel labels."""
import itertools
import json

import numpy as np
import pytest
import torch

from detectron2.structures import Instances

from part_distill.evaluation import PartMIoUEvaluator
from part_distill.evaluation.miou import in_match_split
from part_distill.evaluation.synthetic import synthetic_parts_dataset, synthetic_predictions
from part_distill.utils.masks import encode_rle
from test_eval_nmi_ari import _evaluate, brute_pixel_labels


def _brute_miou(labels, match_ids, eval_ids, method, part_classes_of, given=None):
    """Association by explicit counting (majority) or exhaustive search (hungarian), IoU by counting.

    ``given`` ({class: mapping}) replaces an exhaustive-search optimum by another optimum of equal
    total overlap (optima can tie); the IoUs are then computed under the given mapping."""
    result = {}
    for c in sorted({l[1] for l in labels}):
        overlap = {}
        for img, oc, pred, g in labels:
            if oc == c and img in match_ids and g >= 0 and pred[1] >= 0:
                overlap[(pred, g)] = overlap.get((pred, g), 0) + 1
        preds = sorted({p for p, _ in overlap})
        gts = sorted({g for _, g in overlap})
        mapping = {}
        if method == "majority":
            for p in preds:
                best = max(gts, key=lambda g: (overlap.get((p, g), 0), -g))
                if overlap.get((p, best), 0) > 0:
                    mapping[p] = best
        else:
            best_total, best_map = -1, {}
            small, large = (preds, gts) if len(preds) <= len(gts) else (gts, preds)
            for perm in itertools.permutations(large, len(small)):
                pairs = list(zip(small, perm)) if small is preds else [(p, g) for g, p in zip(small, perm)]
                total = sum(overlap.get(pg, 0) for pg in pairs)
                if total > best_total:
                    best_total, best_map = total, {p: g for p, g in pairs if overlap.get((p, g), 0) > 0}
            mapping = best_map
            if given is not None:
                assert sum(overlap.get(pg, 0) for pg in given.get(c, {}).items()) == best_total
                assert len(set(given.get(c, {}).values())) == len(given.get(c, {}))  # one-to-one
                mapping = given.get(c, {})
        ev = [(mapping.get(pred, -2), g) for img, oc, pred, g in labels if oc == c and img in eval_ids]
        if not ev:
            continue
        ious = []
        for part in sorted(set(part_classes_of[c]) | {g for _, g in ev if g >= 0} | {p for p, _ in ev if p >= 0}):
            tp = sum(1 for p, g in ev if p == part and g == part)
            union = sum(1 for p, g in ev if p == part or g == part)
            if union:
                ious.append(tp / union)
        if ious:
            result[c] = (100 * float(np.mean(ious)), mapping)
    return result


@pytest.mark.parametrize("seed,method,fraction,unlabeled", [
    (0, "majority", 0.5, "ignore"), (1, "majority", 0.3, "label"), (2, "hungarian", 0.5, "ignore"),
    (3, "majority", 0.0, "ignore"), (4, "hungarian", 0.0, "label")])
def test_miou_matches_brute_force(seed, method, fraction, unlabeled, tmp_path):
    dicts, meta = synthetic_parts_dataset(10, 20, 24, parts_per_class=3, seed=seed)
    rng = np.random.default_rng(seed)
    outputs = [synthetic_predictions(d, int(rng.integers(0, 10)), num_clusters=3, score_levels=3,
                                     seed=seed * 70 + i) for i, d in enumerate(dicts)]
    res = _evaluate(PartMIoUEvaluator, dicts, meta, outputs, association=method, match_fraction=fraction,
                    unlabeled_gt=unlabeled, output_dir=str(tmp_path))["parts_miou"]
    ids = [d["image_id"] for d in dicts]
    match = {i for i in ids if in_match_split(i, fraction)}
    evals = set(ids) - match
    separate = bool(match and evals)
    if not separate:
        match = evals = set(ids)
    assert res["separate_split"] == float(separate)
    labels = brute_pixel_labels(dicts, outputs, unlabeled)
    written = json.loads((tmp_path / "parts_association.json").read_text())
    got = {int(c): {(a, b): p for a, b, p in pairs} for c, pairs in written["classes"].items()}
    expected = _brute_miou(labels, match, evals, method, meta["object_part_classes"],
                           given=got if method == "hungarian" else None)
    assert expected
    for c, (value, mapping) in expected.items():
        assert abs(res[f"mIoU-object{c}"] - value) < 1e-9
        assert got.get(c, {}) == mapping
    assert abs(res["mIoU"] - np.mean([v for v, _ in expected.values()])) < 1e-9
    report = (tmp_path / "parts_miou.md").read_text()
    assert ("NO SEPARATE SPLIT" in report) == (not separate)


def _one_object_image(image_id, gt_parts, h=2, w=4):
    obj = np.zeros((h, w), bool)
    for m in gt_parts:
        obj |= m
    return {"file_name": "x", "height": h, "width": w, "image_id": image_id, "annotations": [
        {"category_id": 0, "segmentation": encode_rle(obj), "iscrowd": 0, "id": 1000 + image_id,
         "parts": [{"category_id": j, "segmentation": encode_rle(m), "id": 10 * image_id + j}
                   for j, m in enumerate(gt_parts)]}]}


def _output(masks, scores, clusters):
    masks = np.asarray(masks, bool).reshape(-1, 2, 4)
    inst = Instances(masks.shape[1:])
    inst.pred_masks = torch.from_numpy(masks)
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_clusters = torch.tensor(clusters, dtype=torch.long)
    inst.object_index = torch.zeros(len(scores), dtype=torch.long)
    inst.object_classes = torch.zeros(len(scores), dtype=torch.long)
    return {"parts": inst}


def test_miou_hand_computed_with_unmatched_cluster_tie_and_empty_predictions(tmp_path):
    left = np.array([[1, 1, 0, 0]] * 2, bool)
    right = ~left
    meta = {"thing_classes": ["obj"], "part_classes": ["L", "R"], "object_part_classes": {0: [0, 1]}}
    dicts = [_one_object_image(0, [left, right]), _one_object_image(1, [left, right])]
    # Image 0 (association): cluster 0 = left, cluster 1 = right.
    # Image 1 (evaluation): clusters 0 and 2 tie in score on column 0; the earlier (cluster 0) wins it;
    # cluster 2 was never seen during association, so its pixel is wrong; the right half is uncovered.
    col0 = np.zeros((2, 4), bool)
    col0[:, 0] = True
    col1 = np.zeros((2, 4), bool)
    col1[:, 1] = True
    outputs = [_output([left, right], [0.9, 0.8], [0, 1]),
               _output([col0, col0 | col1, right], [0.5, 0.5, 0.1], [0, 2, -1])]
    ev = PartMIoUEvaluator(dataset_dicts=dicts, metadata=meta, distributed=False, output_dir=str(tmp_path),
                           association_file="")
    ev._split = lambda recs: ([recs[0]], [recs[1]], True, "test split")
    ev.process([{"image_id": 0}], [outputs[0]])
    ev.process([{"image_id": 1}], [outputs[1]])
    res = ev.evaluate()["parts_miou"]
    # L: TP 2 (col 0), FN 2 (col 1) -> 0.5; R: TP 0, FN 4 -> 0.  mean 25 %.
    assert res["mIoU"] == pytest.approx(25.0, abs=1e-12)
    assert res["num_parts_without_cluster"] == 1
    # The association file lets another dataset be evaluated on all its images.
    ev2 = PartMIoUEvaluator(dataset_dicts=dicts, metadata=meta, distributed=False,
                            association_file=str(tmp_path / "parts_association.json"))
    ev2.process([{"image_id": 1}], [outputs[1]])
    ev2.process([{"image_id": 0}], [_output(np.zeros((0, 2, 4)), [], [])])
    res2 = ev2.evaluate()["parts_miou"]
    # Image 0 without predictions: both parts fully missed. L: TP 2, FN 2+4 -> 0.25; R: 0.
    assert res2["separate_split"] == 1.0 and res2["mIoU"] == pytest.approx(12.5, abs=1e-12)


def test_match_split_is_deterministic_and_near_fraction():
    flags = [in_match_split(i, 0.3, seed=7) for i in range(4000)]
    assert flags == [in_match_split(i, 0.3, seed=7) for i in range(4000)]
    assert abs(np.mean(flags) - 0.3) < 0.03
    assert flags != [in_match_split(i, 0.3, seed=8) for i in range(4000)]
