"""NMI/ARI of PartNMIARIEvaluator against scikit-learn on brute-force per-pixel labels."""
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from part_distill.evaluation import PartNMIARIEvaluator
from part_distill.evaluation.nmi_ari import ari_from_contingency, nmi_from_contingency
from part_distill.evaluation.synthetic import synthetic_parts_dataset, synthetic_predictions
from part_distill.utils.masks import decode_rle


def brute_pixel_labels(dicts, outputs, unlabeled="ignore", assignment="max_overlap"):
    """Per pixel of every GT object, with plain loops: list of (image_id, object class, pred label, gt label)."""
    out = []
    for d, o in zip(dicts, outputs):
        p = o["parts"]
        masks, scores = p.pred_masks.numpy(), p.scores.numpy().tolist()
        clusters, classes, index = p.pred_clusters.tolist(), p.object_classes.tolist(), p.object_index.tolist()
        objs = [decode_rle(a["segmentation"]) for a in d["annotations"]]
        owner = []
        for i, m in enumerate(masks):
            if assignment == "object_index":
                owner.append(index[i])
                continue
            inter = [int((m & ob).sum()) for ob in objs]
            best = -1
            for j, v in enumerate(inter):
                if v > 0 and (best < 0 or v > inter[best]):
                    best = j
            owner.append(best)
        for oi, (a, ob) in enumerate(zip(d["annotations"], objs)):
            gt_map = np.full(ob.shape, -1)
            for part in a["parts"]:
                gt_map[decode_rle(part["segmentation"]) & ob] = part["category_id"]
            for y, x in zip(*np.nonzero(ob)):
                g = int(gt_map[y, x])
                if g < 0 and unlabeled == "ignore":
                    continue
                best = None
                for i in range(len(masks)):
                    if owner[i] == oi and clusters[i] >= 0 and masks[i][y, x]:
                        if best is None or scores[i] > scores[best]:
                            best = i
                pred = (-1, -1) if best is None else (classes[best], clusters[best])
                out.append((d["image_id"], a["category_id"], pred, g))
    return out


def _evaluate(cls, dicts, meta, outputs, **kwargs):
    ev = cls(dataset_dicts=dicts, metadata=meta, distributed=False, **kwargs)
    ev.reset()
    for d, out in zip(dicts, outputs):
        ev.process([{"image_id": d["image_id"]}], [out])
    return ev.evaluate()


def _sklearn_scores(labels):
    per_class = {}
    for c in sorted({l[1] for l in labels}):
        pred = [str(l[2]) for l in labels if l[1] == c]
        gt = [l[3] for l in labels if l[1] == c]
        per_class[c] = (normalized_mutual_info_score(gt, pred), adjusted_rand_score(gt, pred))
    return per_class


@pytest.mark.parametrize("seed,unlabeled,assignment", [(0, "ignore", "max_overlap"), (1, "label", "max_overlap"),
                                                       (2, "ignore", "object_index"), (3, "label", "object_index")])
def test_nmi_ari_match_sklearn(seed, unlabeled, assignment):
    dicts, meta = synthetic_parts_dataset(8, 20, 24, seed=seed)
    rng = np.random.default_rng(seed)
    outputs = [synthetic_predictions(d, int(rng.integers(0, 12)), score_levels=3, seed=seed * 50 + i)
               for i, d in enumerate(dicts)]
    res = _evaluate(PartNMIARIEvaluator, dicts, meta, outputs, unlabeled_gt=unlabeled,
                    object_assignment=assignment)["parts_nmi_ari"]
    expected = _sklearn_scores(brute_pixel_labels(dicts, outputs, unlabeled, assignment))
    assert len(expected) >= 2
    for c, (nmi, ari) in expected.items():
        assert abs(res[f"NMI-object{c}"] / 100 - nmi) < 1e-9
        assert abs(res[f"ARI-object{c}"] / 100 - ari) < 1e-9
    assert abs(res["NMI"] / 100 - np.mean([v[0] for v in expected.values()])) < 1e-9
    assert abs(res["ARI"] / 100 - np.mean([v[1] for v in expected.values()])) < 1e-9
    assert res["num_parts_without_cluster"] == sum(int((o["parts"].pred_clusters < 0).sum()) for o in outputs)


@pytest.mark.parametrize("seed", range(6))
def test_contingency_formulas_match_sklearn_on_edge_cases(seed):
    rng = np.random.default_rng(seed)
    n = [1, 2, 5, 50, 400, 3000][seed]
    gt = rng.integers(0, [1, 1, 3, 4, 6, 8][seed], size=n)
    pred = gt.copy() if seed == 2 else rng.integers(0, [1, 2, 2, 5, 3, 9][seed], size=n)
    table = np.zeros((pred.max() + 1, gt.max() + 1), dtype=np.int64)
    np.add.at(table, (pred, gt), 1)
    table = table[table.sum(1) > 0][:, table.sum(0) > 0]
    assert abs(nmi_from_contingency(table) - normalized_mutual_info_score(gt, pred)) < 1e-9
    assert abs(ari_from_contingency(table) - adjusted_rand_score(gt, pred)) < 1e-9


def test_ari_does_not_overflow_on_large_counts():
    # 2e7 pixels: pair counts reach 1e28, beyond int64; sklearn converts to Python ints too.
    table = np.array([[10_000_000, 123], [4567, 9_995_310]], dtype=np.int64)
    n = table.sum()
    rows, cols = table.sum(1), table.sum(0)
    sum_comb = sum(int(v) * (int(v) - 1) // 2 for v in table.ravel())
    a = sum(int(v) * (int(v) - 1) // 2 for v in rows)
    b = sum(int(v) * (int(v) - 1) // 2 for v in cols)
    expected_index = a * b / (int(n) * (int(n) - 1) // 2)
    expected = (sum_comb - expected_index) / ((a + b) / 2 - expected_index)  # Hubert & Arabie
    assert abs(ari_from_contingency(table) - expected) < 1e-9
