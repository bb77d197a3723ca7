"""The compiled CPU k-means (part_distill._C) against scikit-learn and the torch path.

References: scikit-learn's KMeans (same init, float32 data), the torch path of batched_kmeans
(same algorithm and random numbers, written with torch ops), the kernel's own baseline-ISA build
(run in a subprocess) and one thread against two.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from part_distill.mining.kmeans import BatchedKMeans, batched_kmeans, dataset_kmeans
from part_distill.utils.native import native_module


def _clustered(B, N, D, seed, protos=5, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(B, protos, D, generator=g)
    which = torch.randint(0, protos, (B, N), generator=g)
    x = centers.gather(1, which[:, :, None].expand(-1, -1, D))
    return x + noise * torch.randn(x.shape, generator=g)


def _assert_same_fit(a, b, rtol=1e-5):
    assert torch.equal(a.skipped, b.skipped)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.n_iter, b.n_iter)
    torch.testing.assert_close(a.centers, b.centers, rtol=rtol, atol=rtol)
    torch.testing.assert_close(a.inertia, b.inertia, rtol=rtol, atol=rtol)


def test_kernel_is_built():
    # make setup compiles it; without it every CPU fit silently runs the slow path.
    assert native_module() is not None, "part_distill._C is missing: run `make setup`"
    assert native_module().kmeans_isa() in ("avx2+fma", "baseline")


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_matches_sklearn_on_separable_float32_data(metric):
    X = np.stack([make_blobs(300, 12, centers=4, cluster_std=0.5, random_state=b)[0] for b in range(6)])
    X = X.astype(np.float32)
    if metric == "cosine":  # unit vectors: spherical and Euclidean k-means then share their labels
        X /= np.linalg.norm(X, axis=-1, keepdims=True)
    init = X[:, [0, 100, 200, 299]]
    res = batched_kmeans(torch.from_numpy(X), k=4, metric="l2", init=torch.from_numpy(init), max_iter=300,
                         backend="native")
    for b in range(6):
        km = KMeans(4, init=init[b], n_init=1, max_iter=300, tol=1e-4).fit(X[b])
        np.testing.assert_array_equal(res.labels[b].numpy(), km.labels_)
        np.testing.assert_allclose(res.centers[b].numpy(), km.cluster_centers_, rtol=1e-4, atol=1e-5)
        assert res.inertia[b].item() == pytest.approx(km.inertia_, rel=1e-4)
        assert res.n_iter[b].item() == km.n_iter_


def test_kmeanspp_as_good_as_sklearns_and_the_test_can_fail():
    # 7 blobs, k=4: many local optima, so the seeding decides the result. Averaged over 4 seeds x 40
    # instances (one seed's mean varies by about 2 %), ours matches scikit-learn's k-means++; the
    # control, the first 4 points as centers, is 16 % worse and fails the same bound.
    X = (_clustered(40, 400, 16, seed=11, protos=7, noise=0.25) * 2).numpy()
    ours = np.mean([batched_kmeans(torch.from_numpy(X), k=4, metric="l2", seed=s, backend="native").inertia.mean()
                    for s in range(4)])
    sk = np.mean([KMeans(4, n_init=1, random_state=100 * s + b).fit(X[b]).inertia_ for s in range(4) for b in range(40)])
    first = batched_kmeans(torch.from_numpy(X), k=4, metric="l2", init=torch.from_numpy(X[:, :4].copy()),
                           backend="native").inertia.mean().item()
    assert ours <= sk * 1.02
    assert first > sk * 1.02


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_equals_torch_path_padding_weights_and_tiny_instances(metric):
    X = _clustered(9, 200, 24, seed=0)
    lengths = torch.tensor([200, 150, 3, 200, 60, 200, 17, 199, 120])
    pad = torch.arange(200)[None] >= lengths[:, None]
    X[pad] = float("nan")  # padding may hold garbage
    w = torch.rand(9, 200, generator=torch.Generator().manual_seed(1))
    w[0, :50] = 0.0  # zero-weight points get labels but pull no center
    kw = dict(k=4, metric=metric, weights=w, seed=7, min_points=5)
    native = batched_kmeans(X, lengths, backend="native", **kw)
    _assert_same_fit(native, batched_kmeans(X, lengths, backend="torch", **kw))
    assert native.skipped.tolist() == [False, False, True] + [False] * 6
    assert (native.labels[pad] == -1).all() and (native.labels[2] == -1).all()


@pytest.mark.parametrize("k", [1, 2, 8])
def test_equals_torch_path_for_other_k_and_given_init(k):
    X = _clustered(5, 300, 40, seed=2, protos=9)
    for metric in ("l2", "cosine"):
        _assert_same_fit(batched_kmeans(X, k=k, metric=metric, seed=1, backend="native"),
                         batched_kmeans(X, k=k, metric=metric, seed=1, backend="torch"))
        init = X[:, :k] * 3.0  # cosine normalises given centers
        _assert_same_fit(batched_kmeans(X, k=k, metric=metric, init=init, backend="native"),
                         batched_kmeans(X, k=k, metric=metric, init=init, backend="torch"))


def test_iteration_cap_zero_returns_the_seeds_and_one_counts_one_pass():
    X = _clustered(4, 100, 8, seed=3)
    for max_iter in (0, 1, 2):
        _assert_same_fit(batched_kmeans(X, k=4, metric="l2", max_iter=max_iter, backend="native"),
                         batched_kmeans(X, k=4, metric="l2", max_iter=max_iter, backend="torch"))
    assert (batched_kmeans(X, k=4, max_iter=1, backend="native").n_iter == 1).all()


def test_empty_cluster_repair_equals_torch_path():
    X = torch.from_numpy(make_blobs(150, 2, centers=3, cluster_std=0.5, random_state=4)[0]).float()
    init = torch.cat([X[[0, 50, 100]], torch.tensor([[1e3, 1e3]])])[None]  # the far center gets no point
    native = batched_kmeans(X[None], k=4, metric="l2", init=init, backend="native")
    _assert_same_fit(native, batched_kmeans(X[None], k=4, metric="l2", init=init, backend="torch"))
    assert torch.bincount(native.labels[0], minlength=4).min() > 0


def test_strided_and_half_inputs():
    X = _clustered(6, 64, 16, seed=5)
    strided = X.transpose(0, 1).contiguous().transpose(0, 1)  # batch stride 16, point stride 6 * 16
    assert not strided.is_contiguous()
    _assert_same_fit(batched_kmeans(strided, k=4, backend="native"), batched_kmeans(X, k=4, backend="native"),
                     rtol=0)
    half = X.half()
    _assert_same_fit(batched_kmeans(half, k=4, backend="native"), batched_kmeans(half, k=4, backend="torch"))


def test_results_do_not_depend_on_threads_or_batch():
    # Many instances (one per thread) and one large instance (its point blocks spread over the
    # threads): bit-identical to one thread, and an instance's fit is the same alone or in a batch.
    small = _clustered(7, 500, 12, seed=6)
    big = _clustered(1, 30000, 12, seed=7)  # several 4096-point blocks
    before = torch.get_num_threads()
    try:
        out = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out[threads] = (batched_kmeans(small, k=4, metric="cosine", instance_seeds=torch.arange(7)),
                            batched_kmeans(big, k=4, metric="l2", seed=3))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(out[1], out[2]):
        _assert_same_fit(a, b, rtol=0)
    alone = batched_kmeans(small[3:4], k=4, metric="cosine", instance_seeds=torch.tensor([3]))
    assert torch.equal(alone.labels[0], out[2][0].labels[3])
    _assert_same_fit(out[2][1], batched_kmeans(big, k=4, metric="l2", seed=3, backend="torch"), rtol=1e-4)


def test_dataset_kmeans_and_configurable_front_end_use_it():
    X = _clustered(1, 5000, 16, seed=8)[0]
    native = dataset_kmeans(X, k=6, metric="cosine", seed=2)
    torch_path = dataset_kmeans(X, k=6, metric="cosine", seed=2, backend="torch")
    assert torch.equal(native.labels, torch_path.labels)
    km = BatchedKMeans(num_clusters=4, metric="l2", backend="native")
    _assert_same_fit(km.fit(X[None, :800]), batched_kmeans(X[None, :800], k=4, metric="l2", backend="torch"))
    with pytest.raises(ValueError, match="backend"):
        BatchedKMeans(backend="fast")


def test_nan_features_raise_or_skip():
    X = _clustered(4, 80, 8, seed=9)
    X[2, 11, 3] = float("inf")
    with pytest.raises(ValueError, match=r"instances \[2\]"):
        batched_kmeans(X, k=4, backend="native")
    res = batched_kmeans(X, k=4, nan_policy="skip", instance_seeds=torch.arange(4), backend="native")
    ref = batched_kmeans(X[[0, 1, 3]], k=4, instance_seeds=torch.tensor([0, 1, 3]), backend="native")
    assert res.skipped.tolist() == [False, False, True, False]
    assert (res.labels[2] == -1).all() and res.n_iter[2] == 0 and res.inertia[2] == 0
    assert torch.equal(res.labels[[0, 1, 3]], ref.labels)


def test_native_refuses_what_it_does_not_serve():
    X = _clustered(2, 50, 4, seed=10)
    with pytest.raises(ValueError, match="float32"):
        batched_kmeans(X.double(), k=3, backend="native")
    with pytest.raises(ValueError, match="float32"):
        batched_kmeans(X, k=3, backend="native", distance_dtype="bfloat16")
    with pytest.raises(ValueError, match="backend must be one of"):
        batched_kmeans(X, k=3, backend="gpu")
    # auto falls back to the torch path for float64 (same result as asking for it)
    _assert_same_fit(batched_kmeans(X.double(), k=3), batched_kmeans(X.double(), k=3, backend="torch"), rtol=0)


@pytest.mark.slow  # two subprocesses that import part_distill (~15 s each)
def test_baseline_isa_build_equals_avx2_build(tmp_path):
    # The portable build serves CPUs without AVX2/FMA; it is chosen at import time, so in a subprocess.
    script = (
        "import sys, torch\n"
        "from part_distill.mining.kmeans import batched_kmeans\n"
        "from part_distill.utils.native import native_module\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(6, 333, 37, generator=g)\n"  # D not a multiple of 8: vector tails
        "r = batched_kmeans(x, k=5, metric='cosine', seed=4, backend='native')\n"
        "torch.save({'isa': native_module().kmeans_isa(), 'r': tuple(r)}, sys.argv[1])\n"
    )
    out = {}
    for isa in ("baseline", ""):
        path = tmp_path / f"{isa or 'default'}.pt"
        env = dict(os.environ, PART_DISTILL_KMEANS_ISA=isa)
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env)
        out[isa] = torch.load(path)
    assert out["baseline"]["isa"] == "baseline"
    base, default = out["baseline"]["r"], out[""]["r"]
    assert torch.equal(base[0], default[0]) and torch.equal(base[3], default[3])
    torch.testing.assert_close(base[1], default[1], rtol=1e-5, atol=1e-5)
