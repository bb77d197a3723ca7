"""Cache blocking, point blocks, the flop count and the CUDA path of the batched k-means.

References: the unblocked CPU fit (one chunk, one point block), hand-computed counts, and the
CPU result for the GPU run. The blocking tests run the torch path (``backend="torch"``), whose
mechanisms they check; the compiled kernel has its own tests in test_kmeans_native.py.
"""
import pytest
import torch

from part_distill.mining import kmeans as km
from part_distill.mining.kmeans import batched_kmeans, kmeans_flops
from part_distill.utils.roofline import roofline


def _clustered(B, N, D, seed):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(B, 5, D, generator=g)
    which = torch.randint(0, 5, (B, N), generator=g)
    x = protos.gather(1, which[:, :, None].expand(-1, -1, D))
    return x + 0.3 * torch.randn(x.shape, generator=g)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_cache_blocked_default_equals_one_chunk(metric, monkeypatch):
    X = _clustered(9, 100, 16, seed=0)
    lengths = torch.tensor([100, 80, 60, 100, 7, 100, 50, 99, 100])
    w = torch.rand(9, 100, generator=torch.Generator().manual_seed(1))
    # A cache budget of ~2 instances: chunks sorted by size (lengths differ), point blocks of 256 (> N: none).
    monkeypatch.setattr(km, "CPU_CACHE_BYTES", 2 * 100 * 16 * 4)
    blocked = batched_kmeans(X, lengths, k=4, metric=metric, weights=w, seed=3, backend="torch")
    whole = batched_kmeans(X, lengths, k=4, metric=metric, weights=w, seed=3, max_chunk_bytes=1 << 30,
                           backend="torch")
    assert torch.equal(blocked.labels, whole.labels)
    torch.testing.assert_close(blocked.centers, whole.centers, rtol=0, atol=0)
    # The inertia sums over each chunk's padded length, which sorting by size changes: 1-ulp slack.
    torch.testing.assert_close(blocked.inertia, whole.inertia, rtol=1e-6, atol=0)
    assert torch.equal(blocked.n_iter, whole.n_iter)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_point_blocks_equal_one_block(metric):
    # One fused pass per block of 37 points (labels, distances and center sums) = the whole pass.
    X = _clustered(3, 300, 8, seed=2).double()
    init = X[:, [0, 50, 100, 150]]
    a = batched_kmeans(X, k=4, metric=metric, init=init, point_chunk=37, max_chunk_bytes=1 << 30)
    b = batched_kmeans(X, k=4, metric=metric, init=init, max_chunk_bytes=1 << 30)
    assert torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.centers, b.centers, rtol=1e-12, atol=1e-12)
    assert torch.equal(a.n_iter, b.n_iter)


def test_kmeans_flops_hand_count():
    # k=4: 2 + int(log 4) = 3 candidates per round -> 1 + 3 * 3 = 10 products for seeding;
    # each Lloyd iteration: 4 products + 1 sum, 2 flops each.
    assert kmeans_flops(1000, 10, 4, 3) == 1000 * 10 * (2 * 10 + 3 * 10)
    assert kmeans_flops(5, 2, 1, 0) == 5 * 2 * 2


def test_roofline_picks_the_larger_bound():
    r = roofline(4.0, nbytes=100, flops=600, bandwidth=100, peak=200)  # 1 s of bytes, 3 s of flops
    assert r["bound"] == "compute" and r["limit_s"] == 3.0 and r["fraction"] == 0.75
    r = roofline(2.0, flops=10, peak=100, read_seconds=1.5)
    assert r["bound"] == "bandwidth" and r["limit_s"] == 1.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_cuda_matches_cpu(metric):
    X = _clustered(6, 200, 32, seed=4)
    lengths = torch.tensor([200, 150, 200, 90, 200, 120])
    cpu = batched_kmeans(X, lengths, k=4, metric=metric, seed=5, backend="torch")
    gpu = batched_kmeans(X.cuda(), lengths.cuda(), k=4, metric=metric, seed=5)
    assert torch.equal(gpu.labels.cpu(), cpu.labels)
    torch.testing.assert_close(gpu.centers.cpu(), cpu.centers, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu.inertia.cpu(), cpu.inertia, rtol=1e-4, atol=1e-4)
    low = batched_kmeans(X.cuda(), lengths.cuda(), k=4, metric=metric, seed=5, distance_dtype="bfloat16")
    assert (low.labels.cpu() == cpu.labels).float().mean() > 0.99


def test_plan_chunks_sorts_by_extent_and_trims_padding():
    from part_distill.mining.kmeans import _plan_chunks

    extent = torch.tensor([100, 10, 0, 12, 90, 11])
    skipped = torch.tensor([False, False, True, False, False, False])
    # Budget of 40 padded points: the three small instances together (3 x 12), then one each.
    plan = _plan_chunks(extent, skipped, None, 40)
    assert [(idx.tolist(), n) for idx, n in plan] == [([1, 5, 3], 12), ([4], 90), ([0], 100)]
    # Fixed chunk size: consecutive, skipped left out, cut to the chunk's largest extent.
    plan = _plan_chunks(extent, skipped, 2, None)
    assert [(idx if isinstance(idx, slice) else idx.tolist(), n) for idx, n in plan] == \
        [(slice(0, 2), 100), ([3], 12), (slice(4, 6), 90)]


def test_mixed_sizes_equal_one_at_a_time():
    # Sorting and trimming must not leak padding or other instances into a fit.
    g = torch.Generator().manual_seed(6)
    lengths = [300, 12, 150, 40, 300, 7]
    X = torch.randn(6, 300, 4, generator=g, dtype=torch.float64)
    res = batched_kmeans(X, torch.tensor(lengths), k=3, metric="l2", instance_seeds=torch.arange(6))
    for i, n in enumerate(lengths):
        one = batched_kmeans(X[i : i + 1, :n], k=3, metric="l2", instance_seeds=torch.tensor([i]))
        assert torch.equal(res.labels[i, :n], one.labels[0]) and (res.labels[i, n:] == -1).all()
        torch.testing.assert_close(res.centers[i], one.centers[0], rtol=1e-12, atol=1e-12)


def test_chunks_on_threads_equal_one_thread(monkeypatch):
    # With several torch threads on CPU, cache-sized chunks run one per thread: same result.
    X = _clustered(8, 120, 8, seed=7)
    lengths = torch.tensor([120, 100, 30, 120, 64, 9, 120, 77])
    monkeypatch.setattr(km, "CPU_CACHE_BYTES", 2 * 120 * 8 * 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = batched_kmeans(X, lengths, k=4, metric="cosine", seed=2, backend="torch")
        torch.set_num_threads(2)
        two = batched_kmeans(X, lengths, k=4, metric="cosine", seed=2, backend="torch")
        assert torch.get_num_threads() == 2  # restored after the pool
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one.labels, two.labels)
    torch.testing.assert_close(one.centers, two.centers, rtol=0, atol=0)
    assert torch.equal(one.n_iter, two.n_iter)
