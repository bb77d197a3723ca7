"""Batched torch k-means vs scikit-learn / brute-force references."""
import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from part_distill.mining.kmeans import (
    BatchedKMeans,
    assign,
    batched_kmeans,
    batched_kmeans_packed,
    dataset_kmeans,
)


def _blobs(B, N, D, k, seed, std=0.5):
    xs = [make_blobs(N, D, centers=k, cluster_std=std, random_state=seed + b)[0] for b in range(B)]
    return np.stack(xs)


def _sk(x, init, w=None, max_iter=300, tol=1e-4):
    return KMeans(init.shape[0], init=init, n_init=1, max_iter=max_iter, tol=tol).fit(x, sample_weight=w)


def _spherical_reference(x, init, max_iter=300):
    """Plain numpy spherical k-means, one instance, iterate until labels stop changing."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = init / np.linalg.norm(init, axis=1, keepdims=True)
    labels = None
    for _ in range(max_iter):
        new = np.argmax(x @ c.T, axis=1)
        if labels is not None and (new == labels).all():
            break
        labels = new
        for j in range(c.shape[0]):
            s = x[labels == j].sum(0)
            c[j] = s / np.linalg.norm(s)
    labels = np.argmax(x @ c.T, axis=1)
    return labels, (1.0 - (x * c[labels]).sum(1)).sum()


def test_l2_matches_sklearn_on_separable_data():
    X = _blobs(6, 300, 5, 4, seed=0)
    init = X[:, [0, 100, 200, 299]]
    res = batched_kmeans(torch.from_numpy(X), k=4, metric="l2", init=torch.from_numpy(init), max_iter=300)
    for b in range(6):
        km = _sk(X[b], init[b])
        assert res.inertia[b].item() == pytest.approx(km.inertia_, rel=1e-9)
        np.testing.assert_array_equal(res.labels[b].numpy(), km.labels_)
        np.testing.assert_allclose(res.centers[b].numpy(), km.cluster_centers_, rtol=1e-9, atol=1e-9)
        assert res.n_iter[b].item() == km.n_iter_
    assert not res.skipped.any()


def test_cosine_matches_bruteforce_spherical_kmeans():
    # Directions clustered around 4 random axes (separable on the sphere).
    rng = np.random.default_rng(1)
    axes = rng.normal(size=(5, 4, 16))
    X = np.stack([axes[b][rng.integers(0, 4, 200)] + 0.3 * rng.normal(size=(200, 16)) for b in range(5)])
    init = X[:, :4].copy()
    res = batched_kmeans(torch.from_numpy(X), k=4, metric="cosine", init=torch.from_numpy(init),
                         max_iter=300, tol=0.0)
    for b in range(5):
        labels, inertia = _spherical_reference(X[b], init[b])
        assert res.inertia[b].item() == pytest.approx(inertia, rel=1e-9)
        np.testing.assert_array_equal(res.labels[b].numpy(), labels)
    np.testing.assert_allclose(res.centers.norm(dim=-1).numpy(), 1.0, rtol=1e-12)


def test_never_worse_than_sklearn_on_random_float32_data():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(40, 256, 8)).astype(np.float32)
    init = X[:, :4].copy()
    res = batched_kmeans(torch.from_numpy(X), k=4, metric="l2", init=torch.from_numpy(init), max_iter=300)
    for b in range(40):
        km = _sk(X[b], init[b])
        assert res.inertia[b].item() <= km.inertia_ * (1 + 1e-4)


def test_kmeanspp_deterministic_by_seed_and_chunking_and_padding_ignored():
    X = torch.from_numpy(_blobs(7, 120, 6, 4, seed=3)).float()
    lengths = torch.tensor([120, 90, 60, 120, 30, 100, 5])
    X[torch.arange(120)[None] >= lengths[:, None]] = float("nan")  # padding may hold garbage
    a = batched_kmeans(X, lengths, k=4, metric="l2", seed=5)
    b = batched_kmeans(X, lengths, k=4, metric="l2", seed=5, chunk_size=2)
    c = batched_kmeans(X, lengths, k=4, metric="l2", seed=6)
    torch.testing.assert_close(a.centers, b.centers, rtol=0, atol=0)
    assert torch.equal(a.labels, b.labels)
    assert not torch.equal(a.centers, c.centers)
    # max_iter=0 returns the k-means++ seeds: distinct real (unpadded) points of each instance.
    seeds = batched_kmeans(X, lengths, k=4, metric="l2", seed=5, max_iter=0).centers
    for i, n in enumerate(lengths.tolist()):
        d = torch.cdist(seeds[i], X[i, :n], compute_mode="donot_use_mm_for_euclid_dist")
        assert (d.min(1).values < 1e-5).all()
        assert len({int(j) for j in d.argmin(1)}) == 4
        assert (a.labels[i, n:] == -1).all() and (a.labels[i, :n] >= 0).all()


def test_kmeanspp_seeds_spread_over_separated_blobs():
    # Greedy k-means++ must put one seed in each of 4 far-apart tight blobs.
    X = torch.from_numpy(_blobs(10, 200, 3, 4, seed=10, std=0.01)).float()
    res = batched_kmeans(X, k=4, metric="l2", seed=0, max_iter=0)
    for b in range(10):
        blob_of_seed = torch.cdist(res.centers[b], X[b]).argmin(1)
        truth = torch.cdist(X[b], X[b][blob_of_seed]).argmin(1)
        assert len(set(truth.tolist())) == 4


def test_empty_cluster_repaired_like_sklearn():
    X = _blobs(1, 150, 2, 3, seed=4)[0]
    init = np.concatenate([X[[0, 50, 100]], [[1e3, 1e3]]])  # the far center gets no point
    res = batched_kmeans(torch.from_numpy(X)[None], k=4, metric="l2", init=torch.from_numpy(init)[None])
    km = _sk(X, init)
    assert res.inertia[0].item() == pytest.approx(km.inertia_, rel=1e-9)
    assert torch.bincount(res.labels[0], minlength=4).min() > 0


def test_tiny_instances_skipped_and_counted():
    X = torch.randn(3, 10, 4)
    res = batched_kmeans(X, torch.tensor([3, 10, 6]), k=4, min_points=5)
    assert res.skipped.tolist() == [True, False, False]
    assert (res.labels[0] == -1).all() and res.inertia[0] == 0 and res.n_iter[0] == 0
    assert batched_kmeans(X, torch.tensor([3, 10, 6]), k=4, min_points=8).skipped.tolist() == [True, False, True]


def test_nan_features_raise_or_skip():
    X = torch.randn(3, 50, 4, dtype=torch.float64)
    X[1, 7, 2] = float("nan")
    with pytest.raises(ValueError, match=r"instances \[1\]"):
        batched_kmeans(X, k=4)
    init = X[:, :4].clone()
    init[1] = 0.0
    res = batched_kmeans(X, k=4, metric="l2", init=init, nan_policy="skip")
    ref = batched_kmeans(X[[0, 2]], k=4, metric="l2", init=init[[0, 2]])
    assert res.skipped.tolist() == [False, True, False]
    torch.testing.assert_close(res.inertia[[0, 2]], ref.inertia)
    assert (res.labels[1] == -1).all()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_batched_equals_one_at_a_time(metric):
    g = torch.Generator().manual_seed(7)
    lengths = [64, 17, 40, 64, 33]
    xs = [torch.randn(n, 8, generator=g, dtype=torch.float64) for n in lengths]
    inits = torch.stack([x[:4] for x in xs])
    labels, res = batched_kmeans_packed(xs, k=4, metric=metric, init=inits)
    for i, x in enumerate(xs):
        one = batched_kmeans(x[None], k=4, metric=metric, init=inits[i : i + 1])
        assert torch.equal(labels[i], one.labels[0])
        torch.testing.assert_close(res.centers[i], one.centers[0])
        torch.testing.assert_close(res.inertia[i], one.inertia[0])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_weighted_equals_repeated_points(metric):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(60, 5, generator=g, dtype=torch.float64)
    w = torch.randint(1, 4, (60,), generator=g)
    rep = x.repeat_interleave(w, dim=0)
    init = x[:4][None]
    a = batched_kmeans(x[None], k=4, metric=metric, init=init, weights=w[None].double())
    b = batched_kmeans(rep[None], k=4, metric=metric, init=init)
    torch.testing.assert_close(a.centers, b.centers)
    torch.testing.assert_close(a.inertia, b.inertia)
    assert torch.equal(a.labels[0].repeat_interleave(w), b.labels[0])
    if metric == "l2":
        km = _sk(x.numpy(), init[0].numpy(), w=w.numpy().astype(float))
        assert a.inertia[0].item() == pytest.approx(km.inertia_, rel=1e-9)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_assign_is_nearest_center_in_fit_metric(metric):
    g = torch.Generator().manual_seed(9)
    X = torch.randn(4, 80, 6, generator=g)
    res = batched_kmeans(X, k=4, metric=metric)
    assert torch.equal(assign(X, res.centers, metric), res.labels)
    full = torch.randn(4, 500, 6, generator=g)  # e.g. upsampled features at mask resolution
    lab = assign(full, res.centers, metric, valid=torch.tensor([500, 10, 0, 250]), point_chunk=64)
    xn = torch.nn.functional.normalize(full, dim=-1) if metric == "cosine" else full
    brute = ((xn[:, :, None] - res.centers[:, None]) ** 2).sum(-1).argmin(-1)
    assert torch.equal(lab[0], brute[0]) and torch.equal(lab[3, :250], brute[3, :250])
    assert (lab[1, 10:] == -1).all() and (lab[2] == -1).all()
    assert torch.equal(assign(full[0], res.centers[0], metric), brute[0])


def test_dataset_kmeans_chunked_equals_unchunked_and_sklearn():
    X = torch.from_numpy(_blobs(1, 1000, 4, 4, seed=11)[0])
    init = X[[0, 1, 2, 3]]
    a = dataset_kmeans(X, k=4, metric="l2", init=init, point_chunk=97)
    b = batched_kmeans(X[None], k=4, metric="l2", init=init[None])
    assert torch.equal(a.labels, b.labels[0])
    torch.testing.assert_close(a.inertia, b.inertia[0])
    assert a.inertia.item() == pytest.approx(_sk(X.numpy(), init.numpy()).inertia_, rel=1e-9)
    # k-means++ with chunked distances gives the same seeds as unchunked.
    c = dataset_kmeans(X, k=4, metric="cosine", seed=3, point_chunk=97, max_iter=0)
    d = dataset_kmeans(X, k=4, metric="cosine", seed=3, point_chunk=1 << 16, max_iter=0)
    torch.testing.assert_close(c.centers, d.centers)


def test_configurable_from_cfg():
    from detectron2.config import get_cfg

    from part_distill.config import add_part_distill_config

    cfg = add_part_distill_config(get_cfg())
    cfg.MINING.METRIC = "l2"
    cfg.MINING.NUM_CLUSTERS = 3
    km = BatchedKMeans(cfg)
    X = torch.from_numpy(_blobs(2, 90, 3, 3, seed=12))
    res = km.fit(X, init=X[:, :3])
    ref = batched_kmeans(X, k=3, metric="l2", init=X[:, :3])
    assert torch.equal(res.labels, ref.labels)
    assert torch.equal(km.assign(X, res.centers), res.labels)
    with pytest.raises(ValueError, match="metric"):
        BatchedKMeans(metric="dot")


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_low_precision_distances_stay_close(metric):
    # The GPU fp16/bf16 option only lowers the matmul precision; the result must stay near fp32.
    from part_distill.mining.kmeans import _distances, _prepare

    g = torch.Generator().manual_seed(13)
    x, c = torch.randn(2, 50, 16, generator=g), torch.randn(2, 4, 16, generator=g)
    valid = torch.ones(2, 50, dtype=torch.bool)
    x, aux, _ = _prepare(x, valid, metric, torch.float32)
    c = torch.nn.functional.normalize(c, dim=-1) if metric == "cosine" else c
    ref = _distances(x, aux, c, metric)
    low = _distances(x.to(torch.bfloat16), aux, c, metric)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=0.05, atol=0.05 * ref.abs().mean().item())


def test_bf16_distances_end_to_end_keep_separable_clusters():
    X = torch.from_numpy(_blobs(3, 200, 8, 4, seed=14)).float()
    ref = batched_kmeans(X, k=4, metric="cosine", seed=0)
    low = batched_kmeans(X, k=4, metric="cosine", seed=0, distance_dtype="bfloat16")
    assert torch.equal(low.labels, ref.labels)
    torch.testing.assert_close(low.centers, ref.centers, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="distance_dtype"):
        batched_kmeans(X, k=4, distance_dtype="int8")


def test_instance_seeds_make_results_independent_of_batch_composition():
    g = torch.Generator().manual_seed(15)
    X = torch.randn(6, 70, 5, generator=g)
    seeds = torch.tensor([11, 22, 33, 44, 55, 66])
    full = batched_kmeans(X, k=4, metric="cosine", instance_seeds=seeds)
    perm = torch.tensor([4, 0, 5, 2])
    part = batched_kmeans(X[perm], k=4, metric="cosine", instance_seeds=seeds[perm])
    assert torch.equal(part.labels, full.labels[perm])
    torch.testing.assert_close(part.centers, full.centers[perm], rtol=1e-6, atol=1e-6)
    other = batched_kmeans(X, k=4, metric="cosine", instance_seeds=seeds + 1, max_iter=0)
    assert not torch.equal(other.centers, batched_kmeans(X, k=4, metric="cosine", instance_seeds=seeds,
                                                         max_iter=0).centers)
    # The counter-based uniforms are uniform enough: mean ~ 1/2, range inside [0, 1).
    from part_distill.mining.kmeans import _counter_uniforms

    u = _counter_uniforms(torch.arange(1000), 50)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
