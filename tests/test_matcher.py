"""Hungarian matcher: exact cost matrix and optimal assignment (vs exhaustive search)."""
import itertools

import numpy as np
import pytest
import torch

from detectron2.config import get_cfg

from part_distill.config import add_part_distill_config
from part_distill.modeling.matcher import HungarianMatcher


def pixel_centre_coords(h, w):
    """Normalised coordinates of every pixel centre: point_sample there reads pixels exactly."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], dim=1).float()


def dense_cost(pred_logits, pred_masks, labels, masks, wc, wm, wd):
    """Per-pair cost by explicit loops over all pixels (float64 numpy)."""
    prob = torch.softmax(pred_logits.double(), -1).numpy()
    x = pred_masks.double().flatten(1).numpy()
    t = masks.double().flatten(1).numpy()
    cost = np.zeros((x.shape[0], t.shape[0]))
    for i in range(x.shape[0]):
        p = 1 / (1 + np.exp(-x[i]))
        for j in range(t.shape[0]):
            bce = -(t[j] * np.log(p) + (1 - t[j]) * np.log(1 - p)).mean()
            dice = 1 - (2 * (p * t[j]).sum() + 1) / (p.sum() + t[j].sum() + 1)
            cost[i, j] = -wc * prob[i, labels[j]] + wm * bce + wd * dice
    return cost


def brute_force_min(cost):
    """Minimum total cost over all injective assignments of the smaller side."""
    q, n = cost.shape
    if q >= n:
        return min(sum(cost[p[j], j] for j in range(n)) for p in itertools.permutations(range(q), n))
    return min(sum(cost[i, p[i]] for i in range(q)) for p in itertools.permutations(range(n), q))


def cfg_or_defaults():
    return add_part_distill_config(get_cfg())


def random_problem(q, n, h=6, w=7, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(1, q, classes + 1, generator=g),
        "pred_masks": 3 * torch.randn(1, q, h, w, generator=g),
    }
    target = {
        "labels": torch.randint(0, classes, (n,), generator=g),
        "masks": torch.rand(n, h, w, generator=g) > 0.5,
    }
    return outputs, target


def test_cost_matrix_equals_dense_computation():
    outputs, target = random_problem(5, 4)
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=3.0, num_points=10)
    cost = matcher.cost_matrix(
        outputs["pred_logits"][0], outputs["pred_masks"][0], target["labels"], target["masks"],
        pixel_centre_coords(6, 7),
    )
    ref = dense_cost(outputs["pred_logits"][0], outputs["pred_masks"][0], target["labels"],
                     target["masks"], 2.0, 5.0, 3.0)
    np.testing.assert_allclose(cost.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_cost_matrix_with_targets_at_higher_resolution():
    """Targets at 4x the prediction resolution, sampled at the prediction's pixel centres,
    read the target pixel whose (4x4) block holds that centre."""
    outputs, target = random_problem(3, 2, h=4, w=5)
    big = target["masks"].repeat_interleave(4, 1).repeat_interleave(4, 2)
    matcher = HungarianMatcher(cost_class=1.0, cost_mask=1.0, cost_dice=1.0, num_points=10)
    coords = pixel_centre_coords(4, 5)
    small_cost = matcher.cost_matrix(outputs["pred_logits"][0], outputs["pred_masks"][0],
                                     target["labels"], target["masks"], coords)
    big_cost = matcher.cost_matrix(outputs["pred_logits"][0], outputs["pred_masks"][0],
                                   target["labels"], big, coords)
    torch.testing.assert_close(small_cost, big_cost)


@pytest.mark.parametrize("q,n,seed", [(5, 3, 0), (4, 4, 1), (6, 2, 2), (3, 5, 3), (5, 5, 4)])
def test_assignment_is_optimal(q, n, seed):
    outputs, target = random_problem(q, n, seed=seed)
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=64)
    torch.manual_seed(seed)
    (cost,) = matcher.compute_costs(outputs, [target])
    ((rows, cols),) = matcher.assign([cost])
    assert len(rows) == min(q, n)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    c = cost.double().numpy()
    np.testing.assert_allclose(c[rows.numpy(), cols.numpy()].sum(), brute_force_min(c), rtol=1e-9)
    # forward() = compute_costs + assign with the same random points.
    torch.manual_seed(seed)
    ((rows_f, cols_f),) = matcher(outputs, [target])
    assert torch.equal(rows_f, rows) and torch.equal(cols_f, cols)


def test_match_many_equals_separate_matching():
    out_a, tgt_a = random_problem(5, 3, seed=7)
    out_b, tgt_b = random_problem(5, 2, seed=8)
    batch = {k: torch.cat([out_a[k], out_b[k]]) for k in out_a}
    other = {k: -v for k, v in batch.items()}
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=50)
    torch.manual_seed(3)
    together = matcher.match_many([batch, other], [tgt_a, tgt_b])
    torch.manual_seed(3)
    separate = [matcher(batch, [tgt_a, tgt_b]), matcher(other, [tgt_a, tgt_b])]
    assert len(together) == 2
    for got, ref in zip(together, separate):
        for (r1, c1), (r2, c2) in zip(got, ref):
            assert torch.equal(r1, r2) and torch.equal(c1, c2)


def test_batch_with_an_image_without_targets():
    out_a, tgt_a = random_problem(4, 3, seed=5)
    out_b, _ = random_problem(4, 1, seed=6)
    outputs = {k: torch.cat([out_a[k], out_b[k]]) for k in out_a}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 6, 7, dtype=torch.bool)}
    matcher = HungarianMatcher(cost_class=1.0, cost_mask=1.0, cost_dice=1.0, num_points=32)
    (ra, ca), (rb, cb) = matcher(outputs, [tgt_a, empty])
    assert len(ra) == 3 and sorted(ca.tolist()) == [0, 1, 2]
    assert rb.numel() == 0 and cb.numel() == 0 and rb.dtype == torch.int64


def test_obvious_matching_is_found():
    """Each query predicts exactly one target's mask and class -> the identity (permuted)."""
    h = w = 8
    masks = torch.zeros(3, h, w, dtype=torch.bool)
    masks[0, :4], masks[1, 4:, :4], masks[2, 4:, 4:] = True, True, True
    labels = torch.tensor([2, 0, 1])
    perm = torch.tensor([2, 0, 1])  # query i predicts target perm[i]
    logits = torch.full((1, 3, 4), -5.0)
    logits[0, torch.arange(3), labels[perm]] = 5.0
    pred_masks = (masks[perm].float() * 20 - 10)[None]
    matcher = HungarianMatcher(cfg_or_defaults())
    ((rows, cols),) = matcher({"pred_logits": logits, "pred_masks": pred_masks},
                              [{"labels": labels, "masks": masks}])
    assert torch.equal(cols[torch.argsort(rows)], perm)


def test_from_config_uses_design_defaults():
    m = HungarianMatcher(cfg_or_defaults())
    assert (m.cost_class, m.cost_mask, m.cost_dice, m.num_points) == (2.0, 5.0, 5.0, 12544)
