"""Class-specific part ranking: prototypes recover known clusters; Eq. 2 exactly; ranks agree."""

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from part_distill.engine.ranking import deal_classes_to_ranks, fit_prototypes_distributed
from part_distill.modeling.part_candidates import select_part_candidates
from part_distill.modeling.ranker import PartRanker

NUM_CLASSES, K, DIM = 3, 8, 16


def _synthetic_candidates(n_per_cluster=40, seed=0):
    """Per class, 8 well separated Gaussian blobs; returns features, classes, true ids, keys."""
    all_centers = np.random.default_rng(1234).normal(scale=6.0, size=(NUM_CLASSES, K, DIM))
    rng = np.random.default_rng(seed)
    feats, classes, truth, keys = [], [], [], []
    for c in range(NUM_CLASSES):
        for j in range(K):
            x = all_centers[c, j] + rng.normal(scale=0.3, size=(n_per_cluster, DIM))
            feats.append(x)
            classes += [c] * n_per_cluster
            truth += [j] * n_per_cluster
    feats = np.concatenate(feats).astype(np.float32)
    n = len(classes)
    perm = rng.permutation(n)
    keys = np.stack([perm, np.zeros(n, int), np.arange(n)], 1)  # image ids in shuffled order
    return feats, np.array(classes), np.array(truth), keys


def _ranker_from(prototypes):
    ranker = PartRanker(NUM_CLASSES, K, DIM)
    for c, centers in prototypes.items():
        ranker.set_class_prototypes(c, centers)
    return ranker


def test_ranking_recovers_known_clusters(tmp_path):
    feats, classes, truth, keys = _synthetic_candidates()
    protos, report = fit_prototypes_distributed(
        feats, classes, np.ones(len(classes)), keys, NUM_CLASSES, K, str(tmp_path), seed=3
    )
    assert report["classes_without_prototypes"] == []
    ranker = _ranker_from(protos)
    # held-out samples of the same blobs
    test_feats, test_classes, test_truth, _ = _synthetic_candidates(n_per_cluster=10, seed=99)
    _, ids, scores = ranker(torch.from_numpy(test_feats), torch.from_numpy(test_classes))
    for c in range(NUM_CLASSES):
        sel = test_classes == c
        assert adjusted_rand_score(test_truth[sel], ids.numpy()[sel]) >= 0.95
    assert (scores > 0.5).float().mean() > 0.9  # points sit near their own prototype


def test_ranker_matches_equation_2():
    torch.manual_seed(0)
    ranker = PartRanker(2, 4, 5)
    ranker.set_class_prototypes(0, torch.randn(4, 5))
    ranker.set_class_prototypes(1, torch.randn(3, 5))  # class 1 has only 3 prototypes
    f = torch.randn(6, 5)
    cls = torch.tensor([0, 1, 0, 1, -1, 1])
    probs, ids, scores = ranker(f, cls)
    for i in range(6):
        c = int(cls[i])
        if c < 0:
            assert ids[i] == -1 and scores[i] == 0 and probs[i].abs().sum() == 0
            continue
        nk = 4 if c == 0 else 3
        d = np.linalg.norm(f[i].numpy()[None] - ranker.prototypes[c, :nk].numpy(), axis=1)
        r = np.exp(-d) / np.exp(-d).sum()
        np.testing.assert_allclose(probs[i, :nk].numpy(), r, rtol=1e-5)
        assert probs[i, nk:].abs().sum() == 0
        assert ids[i] == int(np.argmax(r))
        np.testing.assert_allclose(float(scores[i]), r.max(), rtol=1e-5)


def test_class_without_candidates_is_reported(tmp_path):
    feats, classes, _, keys = _synthetic_candidates()
    keep = classes != 2
    protos, report = fit_prototypes_distributed(
        feats[keep], classes[keep], np.ones(keep.sum()), keys[keep], NUM_CLASSES, K, str(tmp_path)
    )
    assert report["classes_without_prototypes"] == [2]
    ranker = _ranker_from(protos)
    _, ids, _ = ranker(torch.from_numpy(feats[:3]), torch.tensor([2, 2, 0]))
    assert ids[0] == -1 and ids[1] == -1 and ids[2] >= 0


def test_deal_classes_balances_load():
    counts = [100, 90, 10, 10, 5, 0]
    owner = deal_classes_to_ranks(counts, 2)
    load = [sum(counts[c] for c in owner if owner[c] == r) for r in range(2)]
    assert sorted(load) == [105, 110]  # optimal here: {100, 5} vs {90, 10, 10}


def _ranking_worker(out_dir, result_path):
    from detectron2.utils import comm

    feats, classes, _, keys = _synthetic_candidates()
    rank, world = comm.get_rank(), comm.get_world_size()
    # shard candidates by image id across ranks, as the stage runner does
    sel = keys[:, 0] % world == rank
    protos, _ = fit_prototypes_distributed(
        feats[sel], classes[sel], np.ones(sel.sum()), keys[sel], NUM_CLASSES, K, out_dir, seed=1
    )
    if rank == 0:
        torch.save({c: v for c, v in protos.items()}, result_path)


def test_two_process_gloo_equals_one_process(tmp_path):
    from detectron2.engine import launch

    one = str(tmp_path / "one.pt")
    two = str(tmp_path / "two.pt")
    _ranking_worker(str(tmp_path / "single"), one)
    launch(_ranking_worker, 2, dist_url="auto", args=(str(tmp_path / "dist"), two))
    a, b = torch.load(one), torch.load(two)
    assert sorted(a) == sorted(b) == list(range(NUM_CLASSES))
    for c in a:
        torch.testing.assert_close(a[c], b[c], rtol=0, atol=0)


def test_candidates_match_brute_force():
    g = torch.Generator().manual_seed(0)
    Q, H, W = 6, 12, 10
    probs = torch.rand(Q, H, W, generator=g)
    scores = torch.tensor([0.9, 0.2, 0.5, 0.35, 0.8, 0.31])
    obj = torch.zeros(H, W, dtype=torch.bool)
    obj[2:11, 1:9] = True
    ids, won, ratio = select_part_candidates(probs, scores, obj, 0.3, 0.05)
    area = obj.sum().item()
    expected_ids = []
    wins = np.zeros(Q)
    owner = np.full((H, W), -1)
    for y in range(H):
        for x in range(W):
            if obj[y, x]:
                q = int(np.argmax([probs[i, y, x] * scores[i] for i in range(Q)]))
                wins[q] += 1
                owner[y, x] = q
    for q in range(Q):
        if scores[q] > 0.3 and wins[q] / area >= 0.05:
            expected_ids.append(q)
    assert ids.tolist() == expected_ids
    for j, q in enumerate(expected_ids):
        assert torch.equal(won[j], torch.from_numpy(owner == q))
        assert abs(ratio[j].item() - wins[q] / area) < 1e-6
