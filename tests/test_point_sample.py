"""The bounded per-class point sample of dataset-level k-means: independent of batching, order and
ranks, bounded while collecting, all points below the cap, uniform over seeds."""
import numpy as np
import torch

from part_distill.mining.point_sample import ClassPointSample


def _records(num_objects=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num_objects):
        n = int(torch.randint(5, 30, (1,), generator=g))
        out.append((i // 2, i % 2, i % 3, torch.randn(n, 4, generator=g), torch.rand(n, generator=g)))
    return out


def _brute_all(records, cat):
    rows = sorted((r for r in records if r[2] == cat), key=lambda r: r[:2])
    return torch.cat([r[3] for r in rows]), torch.cat([r[4] for r in rows])


def test_sample_does_not_depend_on_order_batching_or_ranks():
    records = _records()
    one = ClassPointSample(25, seed=3).add_records(records)
    # Two "ranks" with interleaved, reversed shares, merged in the other order.
    a = ClassPointSample(25, seed=3).add_records(records[::2][::-1])
    b = ClassPointSample(25, seed=3).add_records(records[1::2])
    merged = ClassPointSample(25, seed=3).merge(b.state()).merge(a.state())
    assert one.classes() == merged.classes() == [0, 1, 2] and merged.num_objects == len(records)
    for cat in one.classes():
        x1, w1 = one.points(cat)
        x2, w2 = merged.points(cat)
        assert len(x1) == 25 and torch.equal(x1, x2) and torch.equal(w1, w2)
        # Every sampled point is one of the class's points, with its own weight.
        allx, allw = _brute_all(records, cat)
        match = (x1[:, None] == allx[None]).all(-1)
        assert match.sum(1).eq(1).all() and torch.equal(allw[match.float().argmax(1)], w1)
    assert not torch.equal(one.points(0)[0], ClassPointSample(25, seed=4).add_records(records).points(0)[0])


def test_memory_is_bounded_while_collecting_and_all_points_kept_below_the_cap():
    records = _records(200)
    s = ClassPointSample(30, seed=0)
    peak = 0
    for r in records:
        s.add(*r)
        peak = max(peak, max(s._held.values()))
    assert peak <= 2 * 30 + 30  # at most 2 x cap plus one object's points before a shrink
    for cap in (0, 10 ** 6):  # no cap, or a cap above every class: all points in (image, object) order
        t = ClassPointSample(cap, seed=0).add_records(records)
        for cat in t.classes():
            x, w = t.points(cat)
            bx, bw = _brute_all(records, cat)
            assert torch.equal(x, bx) and torch.equal(w, bw)


def test_sample_is_uniform_over_seeds():
    # 10 objects x 10 points of one class, cap 20: each point is kept with probability 0.2.
    records = [(i, 0, 0, torch.full((10, 1), float(i)), torch.ones(10)) for i in range(10)]
    kept = np.zeros(10)
    for seed in range(300):
        x, _ = ClassPointSample(20, seed).add_records(records).points(0)
        kept += np.bincount(x[:, 0].long().numpy(), minlength=10)
    freq = kept / (300 * 10)
    # Binomial sd of one object's frequency ~ sqrt(0.2 * 0.8 / 3000) = 0.0073; 5 sd.
    assert np.abs(freq - 0.2).max() < 0.037, freq
