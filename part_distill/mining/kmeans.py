"""Batched k-means: many instances at once, CPU or GPU, one metric for fit and assign.

The reference implementation ran scikit-learn ``KMeans`` one instance at a time on the CPU and
fitted with Euclidean distance but assigned with a dot product. Here every instance of a batch is
clustered together with batched matmuls (no Python loop over instances or pixels), and the same
metric is used for k-means++ seeding, Lloyd iterations, the inertia and :func:`assign`.

Algorithm (per instance, identical to scikit-learn's Lloyd when ``metric="l2"``):
  * k-means++ seeding ("greedy" variant with ``2 + int(log k)`` local trials, like scikit-learn),
    its random numbers drawn up front from one CPU ``torch.Generator``, so a seed gives the same
    result for any chunking of the batch (and, up to float rounding, on any device);
  * Lloyd iterations; an instance stops on strict convergence (labels unchanged) or when the total
    squared center shift is ``<= tol * mean per-dimension variance`` of its (weighted) points;
  * an empty cluster is re-seeded at the point farthest from its own center (that point's weight
    moves out of its old cluster), as scikit-learn does;
  * a final assignment step so labels, centers and inertia agree.

Metrics: ``"l2"`` (squared Euclidean distance, inertia = sum w * ||x - c||^2) and ``"cosine"``
(spherical k-means: features and centers are L2-normalised, inertia = sum w * (1 - cos)).

Instances with fewer than ``max(k, min_points)`` valid points of positive weight are not clustered:
they are flagged in ``KMeansResult.skipped`` (labels -1, centers 0, inertia 0, n_iter 0).
Non-finite features of valid points raise ``ValueError`` (``nan_policy="raise"``) or flag the
instance as skipped (``nan_policy="skip"``); padding may hold anything, NaN included.

Backends: on the CPU, float32 features are fitted by the compiled kernel ``part_distill._C``
(``part_distill/csrc/kmeans_cpu.cpp``, built by ``make setup`` / ``pip install -e .``): one thread
per instance runs seeding, every Lloyd iteration and the final E-step while the instance's
features stay in its cache, each pass computing distances, labels and the new sums together
(the torch path's thin ``[k, D] x [D, n]`` matmuls run far below the CPU's peak); with fewer
instances than threads, an instance's point blocks are spread over the threads instead. It
follows the same steps with the same random numbers; only float rounding differs from the torch
path (its sums are float64), and its results do not depend on the thread count.
``backend="torch"`` forces the torch path, which also serves float64, low-precision distances,
CUDA, and installs without the extension.

Cost of the torch path: features are never copied (float32/float64 input). Each Lloyd iteration
is one fused pass per block of points (scores, labels and the new center sums while the block is
in cache); the first reuses the seeding's scores, and a pass whose labels all stayed put skips
the sums. On CPU instances are clustered in chunks of ``CPU_CACHE_BYTES`` of features (cache
blocking), so seeding (k passes for k-means++) and all iterations of a chunk read it from cache.
Instances that have converged drop out of the batch once that saves work.
"""
import math
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable

from ..utils.native import native_module

__all__ = [
    "KMeansResult",
    "batched_kmeans",
    "batched_kmeans_packed",
    "dataset_kmeans",
    "assign",
    "pad_packed",
    "BatchedKMeans",
    "kmeans_flops",
]

METRICS = ("cosine", "l2")
BACKENDS = ("auto", "native", "torch")
_EPS = 1e-12
# Feature bytes per instance chunk on CPU (default): small enough to stay in the L2/L3 caches
# between the passes of one fit, large enough that per-op overhead stays small.
CPU_CACHE_BYTES = 16 << 20


class KMeansResult(NamedTuple):
    """Output of :func:`batched_kmeans`; unpacks as ``labels, centers, inertia, n_iter, skipped``.

    labels:  LongTensor [B, N], cluster id in [0, k) per valid point, -1 for padding / skipped.
    centers: FloatTensor [B, k, D] (unit norm for cosine), zeros for skipped instances.
    inertia: FloatTensor [B], weighted sum of point-to-center distances in the fitting metric.
    n_iter:  LongTensor [B], Lloyd iterations each instance ran (0 when skipped).
    skipped: BoolTensor [B], instance not clustered (too few points, or non-finite features).
    """

    labels: torch.Tensor
    centers: torch.Tensor
    inertia: torch.Tensor
    n_iter: torch.Tensor
    skipped: torch.Tensor


def _check_metric(metric):
    if metric not in METRICS:
        raise ValueError(f"k-means metric must be one of {METRICS}, got {metric!r}")


def _check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"k-means backend must be one of {BACKENDS}, got {backend!r}")


def _nonfinite_error(bad, where=""):
    """The ValueError of nan_policy="raise" for instances ``bad`` (a [n] index tensor)."""
    return ValueError(f"k-means features of instances {bad[:10].tolist()} contain NaN or inf "
                      f"({bad.numel()} instances{where}); clean them or pass nan_policy='skip'")


def _valid_mask(valid, B, N, device):
    """Accept a [B, N] bool mask, a [B] tensor/list of lengths, or None (all valid)."""
    if valid is None:
        return torch.ones(B, N, dtype=torch.bool, device=device)
    valid = torch.as_tensor(valid, device=device)
    if valid.dim() == 1:
        if valid.shape[0] != B:
            raise ValueError(f"lengths must have shape [B]={B}, got {tuple(valid.shape)}")
        if (valid < 0).any() or (valid > N).any():
            raise ValueError(f"lengths must lie in [0, N={N}]")
        return torch.arange(N, device=device)[None, :] < valid[:, None]
    if tuple(valid.shape) != (B, N):
        raise ValueError(f"valid must be a [B, N]=[{B}, {N}] mask or [B] lengths, got {tuple(valid.shape)}")
    return valid.bool()


def _prepare(x, valid, metric, dtype):
    """Points in the compute dtype plus ``aux``, the per-point quantity the metric needs.

    ``aux`` is the squared norm for "l2" and the inverse norm for "cosine": cosine never builds a
    normalised copy, the scale is folded into the dot products and the center sums instead. The
    features are copied only for a dtype change or when padding holds NaN/inf (then zeroed).
    Returns (x, aux, finite) with finite [b] False where a valid point has a NaN/inf feature
    (seen through its norm, which is computed anyway).
    """
    if x.dtype != dtype:
        x = x.to(dtype)
    norms = torch.linalg.vector_norm(x, dim=-1)
    ok = torch.isfinite(norms)
    if not bool((ok | valid).all()):
        x = x.masked_fill(~valid[:, :, None], 0.0)
        norms = norms.masked_fill(~valid, 0.0)
    finite = (ok | ~valid).all(1)
    norms = norms.masked_fill(~valid, 0.0)
    if metric == "cosine":
        return x, torch.where(norms > _EPS, 1.0 / norms.clamp_min(_EPS), torch.zeros_like(norms)), finite
    return x, norms.square_(), finite


def _points(x, aux, metric, index):
    """Gather points x[b, index[b]] in metric space (unit vectors for cosine); index [b] or [b, t]."""
    ar = torch.arange(x.shape[0], device=x.device)
    ar = ar[:, None] if index.dim() == 2 else ar
    p = x[ar, index]
    return p * aux[ar, index][..., None] if metric == "cosine" else p


def _scores(x, c, metric):
    """[b, m, n] score of points x [b, n, D] against centers c [b, m, D] whose argmin over m is the
    nearest center: ||c||^2 - 2 x.c for l2, -x.c for cosine (points along the last dim: the
    m-row matmul streams the points once, faster than the m-column one on CPU).

    The per-point term (||x||^2 for l2, the inverse norm for cosine) is left out, as scikit-learn
    does: it cannot change the argmin, and :func:`_to_distance` adds it back for the minimum only.
    ``x`` may be a low-precision copy (fp16/bf16): the matmul then runs in that dtype and the
    score comes back in the dtype of ``c``.
    """
    xt = x.transpose(1, 2)
    if x.dtype == c.dtype:
        # One matmul with the scale and the center term folded in (scaling by -2 is exact).
        if metric == "cosine":
            return torch.bmm(c.neg(), xt)
        return torch.baddbmm((c * c).sum(-1)[:, :, None], c, xt, alpha=-2.0)
    dots = torch.bmm(c.to(x.dtype), xt).to(c.dtype)
    if metric == "cosine":
        return dots.neg_()
    return dots.mul_(-2.0).add_((c * c).sum(-1)[:, :, None])


def _min_over_centers(scores):
    """(min, first argmin) over dim 1 of scores [b, m, n]; ~2x faster than ``min(1)`` on CPU,
    whose strided reduction over a short middle dim is slow."""
    if scores.device.type != "cpu":
        return scores.min(1)
    m = scores.shape[1]
    v = scores.amin(1)
    first = torch.arange(m, 0, -1, dtype=torch.int16, device=scores.device)[None, :, None]
    return v, (m - ((scores == v[:, None]) * first).amax(1).long()).clamp_(0, m - 1)


def _to_distance(score, aux, metric):
    """Score (from :func:`_scores`) of a point [b, ..., n] -> its distance in ``metric`` (in place)."""
    if metric == "cosine":
        return score.mul_(aux).add_(1.0).clamp_min_(0.0)
    return score.add_(aux).clamp_min_(0.0)


def _distances(x, aux, c, metric):
    """[b, n, D] x [b, m, D] -> [b, n, m] distances in ``metric``, matmul based."""
    d = _to_distance(_scores(x, c, metric), aux[:, None, :], metric)
    return d.transpose(1, 2)


def _blocks(n, point_chunk):
    return [(s, min(n, s + point_chunk)) for s in range(0, n, point_chunk)]


def _nearest(x, aux, c, metric, point_chunk):
    """Index of and distance to the nearest center [b, n], chunked over points to bound memory."""
    b, n, _ = x.shape
    if point_chunk >= n:
        v, labels = _min_over_centers(_scores(x, c, metric))
        return labels, _to_distance(v, aux, metric)
    labels = torch.empty(b, n, dtype=torch.long, device=x.device)
    mind = torch.empty(b, n, dtype=aux.dtype, device=x.device)
    for s, e in _blocks(n, point_chunk):
        v, labels[:, s:e] = _min_over_centers(_scores(x[:, s:e], c, metric))
        mind[:, s:e] = _to_distance(v, aux[:, s:e], metric)
    return labels, mind


def _lloyd_pass(x, xd, aux, w, sw, c, metric, point_chunk, prev, pad, live, scores=None):
    """One pass over the points: nearest center, its distance and the new per-cluster sums.

    Per block of points (kept in cache between the two matmuls): labels/distances [b, n] and the
    sums of sw * x [b, k, D] and of w [b, k] (w=0 drops a point). Also returns ``same`` [b],
    labels unchanged from ``prev`` (``pad`` [b, n]: points that do not count); when that holds for every ``live`` row of a single block, the
    sums (those of the previous pass) are not recomputed and come back as None. ``scores``
    [b, k, n] (single block only) are this pass's scores when already known (from the seeding).
    """
    b, n, d = x.shape
    k = c.shape[1]

    def labels_of(s, e):
        v, lab = _min_over_centers(_scores(xd[:, s:e], c, metric) if scores is None else scores)
        return lab, _to_distance(v, aux[:, s:e], metric)

    def sums_of(lab, s, e):
        # Weighted one-hot [b, k, block]: the center sums are one matmul with the points.
        wo = x.new_zeros(b, k, e - s).scatter_(1, lab[:, None], w[:, None, s:e])
        so = wo if sw is w else x.new_zeros(b, k, e - s).scatter_(1, lab[:, None], sw[:, None, s:e])
        return torch.bmm(so, x[:, s:e]), wo.sum(2)

    if point_chunk >= n:
        labels, mind = labels_of(0, n)
        same = ((labels == prev) | pad).all(1)
        if bool((same | ~live).all()):
            return labels, mind, None, None, same
        return (labels, mind) + sums_of(labels, 0, n) + (same,)
    labels = torch.empty(b, n, dtype=torch.long, device=x.device)
    mind = torch.empty(b, n, dtype=aux.dtype, device=x.device)
    sums = x.new_zeros(b, k, d)
    counts = x.new_zeros(b, k)
    for s, e in _blocks(n, point_chunk):
        lab, mind[:, s:e] = labels_of(s, e)
        labels[:, s:e] = lab
        su, cnt = sums_of(lab, s, e)
        sums += su
        counts += cnt
    return labels, mind, sums, counts, ((labels == prev) | pad).all(1)


def _sample_by_cdf(p, u, last):
    """Inverse-CDF sampling: p [b, n] >= 0, u [b, t] in [0, 1) -> indices [b, t] with p > 0.

    Done in float64 so long rows keep exact-enough cumulative sums (scikit-learn's stable_cumsum).
    """
    cdf = p.double().cumsum(1)
    idx = torch.searchsorted(cdf, u.double() * cdf[:, -1:], right=True)
    return torch.minimum(idx, last[:, None])


def _kmeans_plusplus(x, xd, aux, w, k, metric, u_first, u_trials, point_chunk):
    """Batched greedy k-means++ (scikit-learn's variant). u_* are uniforms drawn by the caller.

    Seeds are gathered from ``x``; distances use ``xd`` (``x`` or its low-precision copy). Each
    round is one pass over the points for all its candidates together. Returns the seeds
    [b, k, D] and, when the points were one block, their scores [b, k, n] (:func:`_scores`), which
    the first Lloyd iteration reuses instead of another pass; else None.
    """
    b, n, _ = x.shape
    ar = torch.arange(b, device=x.device)
    pos = w > 0
    # Last point of positive weight: clamps rounding overshoot of the CDF search onto a real point.
    last = (n - 1) - pos.flip(1).to(torch.int8).argmax(1)
    first = _sample_by_cdf(w, u_first[:, None], last)[:, 0]
    centers = [_points(x, aux, metric, first)]
    one_block = point_chunk >= n
    if one_block:
        scores = [_scores(xd, centers[0][:, None], metric)[:, 0]]
        closest = _to_distance(scores[0].clone(), aux, metric)
    else:
        closest = _nearest(xd, aux, centers[0][:, None], metric, point_chunk)[1]
    pot = (closest * w).sum(1)
    for c in range(1, k):
        # Degenerate rows (all remaining mass 0: duplicates) fall back to weight-proportional picks.
        p = closest * w
        p = torch.where((pot > 0)[:, None], p, w)
        cand = _sample_by_cdf(p, u_trials[:, c - 1], last)  # [b, t]
        cand_x = _points(x, aux, metric, cand)  # [b, t, D]
        if one_block:
            sc = _scores(xd, cand_x, metric)
            d_cand = torch.minimum(_to_distance(sc.clone(), aux[:, None], metric), closest[:, None])
        else:
            d_cand = torch.empty(b, cand.shape[1], n, dtype=aux.dtype, device=x.device)
            for s, e in _blocks(n, point_chunk):
                d = _to_distance(_scores(xd[:, s:e], cand_x, metric), aux[:, None, s:e], metric)
                torch.minimum(d, closest[:, None, s:e], out=d_cand[:, :, s:e])
        cand_pot = (d_cand * w[:, None, :]).sum(2)  # [b, t]
        best = cand_pot.argmin(1)
        centers.append(cand_x[ar, best])
        if one_block:
            scores.append(sc[ar, best])
        closest = d_cand[ar, best]
        pot = cand_pot[ar, best]
    return torch.stack(centers, 1), (torch.stack(scores, 1) if one_block else None)


def _normalize_centers(c, metric):
    return F.normalize(c, dim=-1, eps=_EPS) if metric == "cosine" else c


def _update_centers(x, w, sw, labels, mind, sums, counts, metric):
    """M-step with empty-cluster repair; returns new centers [b, k, D] and the weighted sum [b, D]."""
    b, k = counts.shape
    ar = torch.arange(b, device=x.device)
    total = sums.sum(1)
    empty = counts <= 0
    if empty.any():
        # Re-seed the r-th empty cluster of an instance at its r-th farthest point; the point's
        # weight leaves its old cluster (so sums stay a partition of the data).
        far = mind.masked_fill(w <= 0, -float("inf")).topk(k, dim=1).indices  # [b, k]
        rank = empty.long().cumsum(1) - 1
        for j in range(k):
            need = empty[:, j]
            if not need.any():
                continue
            p = far[ar, rank[:, j].clamp_min(0)]
            wp = torch.where(need, w[ar, p], torch.zeros_like(w[:, 0]))
            wx = torch.where(need, sw[ar, p], torch.zeros_like(w[:, 0]))[:, None] * x[ar, p]
            old = labels[ar, p].clamp_min(0)
            sums[ar, old] -= wx
            counts[ar, old] -= wp
            sums[:, j] = torch.where(need[:, None], wx, sums[:, j])
            counts[:, j] = torch.where(need, wp, counts[:, j])
    if metric == "cosine":
        # Spherical k-means: the center is the direction of the weighted sum.
        return F.normalize(sums, dim=-1, eps=_EPS), total
    return torch.where(counts[:, :, None] > 0, sums / counts.clamp_min(_EPS)[:, :, None], sums), total


def _fit(x, aux, w, k, metric, init_centers, u_first, u_trials, max_iter, tol, point_chunk, dist_dtype):
    """Fit prepared points x [b, n, D] (``aux`` from _prepare, weights w [b, n]; w=0 is not a point).

    Each Lloyd iteration is one :func:`_lloyd_pass`: the caller sizes ``b`` so the points stay in
    cache across the pass's two matmuls and across iterations (CPU) or fit in memory (GPU).
    """
    b, _, d = x.shape
    # Optional low-precision copy for the distance matmuls; sums stay exact.
    xd = x if dist_dtype is None else x.to(dist_dtype)
    seed_scores = None
    if init_centers is None:
        centers, seed_scores = _kmeans_plusplus(x, xd, aux, w, k, metric, u_first, u_trials, point_chunk)
    else:
        centers = _normalize_centers(init_centers.to(x), metric)

    wsum = w.sum(1)
    # Mean squared norm of the points (unit vectors for cosine): with the mean from the first
    # M-step it gives scikit-learn's tolerance, tol x mean per-dimension variance, for free.
    msq = (w * ((aux > 0).to(w) if metric == "cosine" else aux)).sum(1) / wsum
    # Center sums use unit vectors for cosine: the inverse norm joins the weight.
    sw = w * aux if metric == "cosine" else w
    tol_b = None
    n_iter = torch.zeros(b, dtype=torch.long, device=x.device)
    labels_old = torch.full(w.shape, -1, dtype=torch.long, device=x.device)
    fin_labels = torch.empty_like(labels_old)
    fin_mind = torch.empty_like(w)
    fin_ok = torch.zeros(b, dtype=torch.bool, device=x.device)
    rows = torch.arange(b, device=x.device)  # instances still held in xa (iterating or not)
    live = torch.ones(b, dtype=torch.bool, device=x.device)  # of those, still iterating
    xa, xda, auxa, wa, swa, pada = x, xd, aux, w, sw, w <= 0
    for _ in range(max_iter):
        cur = centers[rows]
        labels, mind, sums, counts, same = _lloyd_pass(
            xa, xda, auxa, wa, swa, cur, metric, point_chunk, labels_old[rows], pada, live, seed_scores
        )
        seed_scores = None
        n_iter[rows] += live.long()
        if sums is None:
            # Every live row kept its labels: its centers are final (strict convergence).
            shift = torch.zeros_like(wa[:, 0])
        else:
            new, total = _update_centers(xa, wa, swa, labels, mind, sums, counts, metric)
            if tol_b is None:
                mean = total / wsum[:, None]
                tol_b = ((msq - (mean * mean).sum(1)) / d).clamp_min(0) * tol
            shift = ((new - cur) ** 2).sum((1, 2))
            centers[rows] = torch.where(live[:, None, None], new, cur)
        labels_old[rows] = torch.where(live[:, None], labels, labels_old[rows])
        # Strictly converged rows already hold labels/distances that match their final centers.
        strict = live & same
        if strict.any():
            r = rows[strict]
            fin_labels[r], fin_mind[r], fin_ok[r] = labels[strict], mind[strict], True
        live &= ~(same if tol_b is None else same | (shift <= tol_b[rows]))
        n_live = int(live.sum())
        if n_live == 0:
            break
        # Drop finished instances once copying the rest costs less than two more passes over them.
        if 2 * (live.numel() - n_live) >= n_live:
            rows, xa, wa, swa, auxa, pada = rows[live], xa[live], wa[live], swa[live], auxa[live], pada[live]
            xda = xa if dist_dtype is None else xda[live]
            live = torch.ones(n_live, dtype=torch.bool, device=x.device)
    # Final E-step (as scikit-learn) for the rows that stopped on tolerance or max_iter.
    rest = (~fin_ok).nonzero().flatten()
    if rest.numel() == b:
        fin_labels, fin_mind = _nearest(xd, aux, centers, metric, point_chunk)
    elif rest.numel() > 0:
        fin_labels[rest], fin_mind[rest] = _nearest(
            xd[rest], aux[rest], centers[rest], metric, point_chunk
        )
    inertia = (fin_mind * w).sum(1)
    return fin_labels, centers, inertia, n_iter


def _signed64(v):
    return v - (1 << 64) if v >= 1 << 63 else v


_GOLDEN, _MIX1, _MIX2 = (_signed64(v) for v in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _counter_uniforms(seeds, count):
    """[B] int64 seeds -> [B, count] float64 uniforms in [0, 1), row b a function of seeds[b] only.

    SplitMix64 on int64 tensors (multiplications wrap; right shifts are masked to be logical), so
    an instance's k-means++ draws do not depend on which batch or rank it is clustered in.
    """
    def lshr(z, n):
        return (z >> n) & ((1 << (64 - n)) - 1)

    z = seeds[:, None] + torch.arange(1, count + 1, dtype=torch.long)[None] * _GOLDEN
    z = (z ^ lshr(z, 30)) * _MIX1
    z = (z ^ lshr(z, 27)) * _MIX2
    z = z ^ lshr(z, 31)
    return lshr(z, 11).double() / float(1 << 53)


def _resolve_dist_dtype(distance_dtype):
    """None (= feature dtype) or a torch dtype, from a dtype or a name ("", "float16", "bfloat16")."""
    if distance_dtype is None or distance_dtype in ("", "none", "float32"):
        return None
    if isinstance(distance_dtype, str):
        if distance_dtype not in ("float16", "bfloat16"):
            raise ValueError(f"distance_dtype must be '', 'float16' or 'bfloat16', got {distance_dtype!r}")
        distance_dtype = getattr(torch, distance_dtype)
    return distance_dtype


def _num_trials(k):
    """Greedy k-means++ candidates per round (scikit-learn's 2 + int(log k))."""
    return 2 + int(math.log(k)) if k > 1 else 1


def kmeans_flops(n_points, dims, k, n_iter):
    """Flops a fit must do: greedy k-means++ ((1 + (k-1) t) point-center products per point) plus,
    per Lloyd iteration, k products and the center sums. ``n_iter`` may be a per-point mean."""
    return n_points * dims * (2 * (1 + (k - 1) * _num_trials(k)) + n_iter * 2 * (k + 1))


def _plan_chunks(extent, skipped, chunk_size, points_budget):
    """Chunks of instances to fit together: [(slice or index tensor, points to keep)].

    Each chunk is cut to the largest extent (last valid point + 1) among its instances. With a
    fixed ``chunk_size``: consecutive instances, skipped ones left out. With a ``points_budget``
    (CPU cache blocking): consecutive instances while their extents are equal, else sorted by
    extent so that instances of similar size share a chunk (little padding), each chunk holding
    at most ``points_budget`` points (padded) unless one instance alone is larger.
    """
    ext = extent.masked_fill(skipped, 0).tolist()  # one host sync, also on CUDA
    keep = [i for i, e in enumerate(ext) if e > 0]
    if not keep:
        return []
    if points_budget is None:
        out = []
        for s in range(0, len(ext), chunk_size):
            e = min(len(ext), s + chunk_size)
            rows = [i for i in range(s, e) if ext[i] > 0]
            if rows:
                idx = slice(s, e) if len(rows) == e - s else torch.tensor(rows, device=extent.device)
                out.append((idx, max(ext[i] for i in rows)))
        return out
    uniform = len(keep) == len(ext) and min(ext) == max(ext)
    order = keep if uniform else sorted(keep, key=lambda i: (ext[i], i))
    out, start = [], 0
    while start < len(order):
        stop = start + 1
        # Sorted ascending, so the last instance sets the chunk's padded size.
        while stop < len(order) and (stop - start + 1) * ext[order[stop]] <= points_budget:
            stop += 1
        rows = order[start:stop]
        n = ext[rows[-1]] if not uniform else ext[0]
        idx = slice(rows[0], rows[-1] + 1) if uniform else torch.tensor(rows, device=extent.device)
        out.append((idx, n))
        start = stop
    return out


def _pick_kernel(backend, device, dtype, dist_dtype, dims):
    """The compiled kernel module when it serves this call, else None (torch path)."""
    if backend == "torch":
        return None
    serves = device.type == "cpu" and dtype == torch.float32 and dist_dtype is None and dims > 0
    kernel = native_module() if serves else None
    if backend == "native" and kernel is None:
        why = "part_distill._C is not built (run `make setup`)" if serves else (
            "it serves CPU float32 features with full-precision distances only")
        raise ValueError(f"k-means backend 'native' cannot run this call: {why}")
    return kernel


def _fit_native(kernel, features, valid, w_all, given, u_first, u_trials, skipped, n_points,
                k, t, metric, max_iter, tol, labels, centers, inertia, n_iter):
    """Fits the non-skipped instances with the compiled kernel, writing into the result tensors.

    Instances are handed out heaviest first, so the threads finish together. Returns finite [B]:
    False where a valid point had a NaN/inf feature (that instance is left unfitted).
    """
    x = features if features.dtype == torch.float32 else features.float()
    if x.stride(2) != 1:  # _pick_kernel only serves D > 0
        x = x.contiguous()
    todo = (~skipped).nonzero().flatten()
    order = todo[torch.argsort(n_points[todo], descending=True, stable=True)].contiguous()
    init = torch.empty(0) if given is None else given.to(torch.float32).contiguous()
    finite = torch.ones(features.shape[0], dtype=torch.bool)
    kernel.kmeans_fit(
        x, valid.contiguous(), w_all.to(torch.float32).contiguous(), init, u_first.contiguous(),
        u_trials.contiguous(), order, k, t, metric == "cosine", int(max_iter), float(tol),
        torch.get_num_threads(), labels, centers, inertia, n_iter, finite,
    )
    return finite


def _auto_chunk(n, d, k, t, elem, max_chunk_bytes):
    """Instances per chunk so a (possible) gathered copy plus distance temporaries fit the budget."""
    per_instance = n * d * elem + n * max(k, t) * 3 * elem + n * (k + 4) * 8
    return max(1, int(max_chunk_bytes // max(per_instance, 1)))


def batched_kmeans(
    features,
    valid=None,
    k=4,
    metric="cosine",
    max_iter=100,
    tol=1e-4,
    seed=0,
    generator=None,
    init="k-means++",
    weights=None,
    min_points=None,
    instance_seeds=None,
    nan_policy="raise",
    chunk_size=None,
    max_chunk_bytes=None,
    point_chunk=None,
    distance_dtype=None,
    backend="auto",
):
    """Cluster each of B instances into k clusters, all instances at once.

    Args:
        features: [B, N, D] float tensor (padded), on any device; results come back on it.
        valid: [B, N] bool mask of real points, or [B] lengths (first L_b rows valid), or None.
        k: number of clusters.
        metric: "cosine" (spherical k-means) or "l2" (squared Euclidean).
        max_iter, tol: Lloyd iteration cap; tolerance on the total squared center shift,
            relative to the mean per-dimension variance of each instance (scikit-learn's rule).
        seed / generator: k-means++ randomness; a CPU ``torch.Generator`` overrides ``seed``.
            The same seed gives the same result on any device and for any chunking.
        instance_seeds: optional [B] int64 seeds, one per instance, overriding seed/generator:
            an instance's result then depends only on its own seed and points, not on the batch
            it is clustered in (use stable ids, e.g. annotation ids, for sharded mining).
        init: "k-means++" or initial centers [B, k, D].
        weights: optional [B, N] non-negative sample weights (weighted k-means).
        min_points: instances with fewer valid points (of positive weight) than
            ``max(k, min_points)`` are skipped.
        nan_policy: "raise" (ValueError naming the instances) or "skip" (flag them as skipped).
        chunk_size: instances per chunk; default: on CPU as many as fit ``CPU_CACHE_BYTES`` of
            features (cache blocking), else derived from ``max_chunk_bytes`` (default on CUDA:
            a quarter of the free memory).
        point_chunk: points per distance block (bounds the [b, n, k] temporaries for huge N).
        distance_dtype: torch.float16 / torch.bfloat16 (or their names) to run the distance
            matmuls on a low-precision copy of the features, halving the bytes most passes read;
            center sums stay exact, distances (so near-tie labels and the inertia) carry the
            low precision. Meant for GPUs (slow on CPU).
        backend: "auto" (the compiled CPU kernel for float32 CPU features with full-precision
            distances when it is built, else torch), "native" (that kernel, an error when it
            cannot serve the call) or "torch". The kernel ignores ``chunk_size``,
            ``max_chunk_bytes`` and ``point_chunk``: it needs O(N) scratch per running instance.

    Returns:
        :class:`KMeansResult` (labels, centers, inertia, n_iter, skipped).
    """
    _check_metric(metric)
    if features.dim() != 3:
        raise ValueError(f"features must be [B, N, D], got shape {tuple(features.shape)}")
    if nan_policy not in ("raise", "skip"):
        raise ValueError(f"nan_policy must be 'raise' or 'skip', got {nan_policy!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _check_backend(backend)
    B, N, D = features.shape
    device = features.device
    dtype = features.dtype if features.dtype in (torch.float32, torch.float64) else torch.float32
    valid = _valid_mask(valid, B, N, device)
    if weights is None:
        w_all = valid.to(dtype)
    else:
        weights = torch.as_tensor(weights, device=device)
        if tuple(weights.shape) != (B, N):
            raise ValueError(f"weights must be [B, N]=[{B}, {N}], got {tuple(weights.shape)}")
        bad = valid & ~(torch.isfinite(weights) & (weights >= 0))
        if bad.any():
            raise ValueError("k-means weights must be finite and >= 0")
        w_all = torch.where(valid, weights.to(dtype), torch.zeros((), dtype=dtype, device=device))

    given = None
    if isinstance(init, str):
        if init != "k-means++":
            raise ValueError(f"init must be 'k-means++' or centers [B, k, D], got {init!r}")
    else:
        given = torch.as_tensor(init, device=device)
        if tuple(given.shape) != (B, k, D):
            raise ValueError(f"init centers must be [B, k, D]=[{B}, {k}, {D}], got {tuple(given.shape)}")
        if not torch.isfinite(given).all():
            raise ValueError("init centers contain NaN or inf")

    # All randomness is drawn up front on the CPU: device- and chunking-independent results.
    t = _num_trials(k)
    n_u = 1 + max(k - 1, 0) * t
    if instance_seeds is not None:
        instance_seeds = torch.as_tensor(instance_seeds, dtype=torch.long).flatten()
        if instance_seeds.numel() != B:
            raise ValueError(f"instance_seeds must hold B={B} seeds, got {instance_seeds.numel()}")
        u = _counter_uniforms(instance_seeds, n_u)
    else:
        if generator is None:
            generator = torch.Generator().manual_seed(int(seed))
        u = torch.rand(B, n_u, generator=generator, dtype=torch.float64)
    u = u.to(device)
    u_first, u_trials = u[:, 0], u[:, 1:].reshape(B, max(k - 1, 0), t)

    n_points = (w_all > 0).sum(1)
    skipped = n_points < max(k, int(min_points or 0))

    labels = torch.full((B, N), -1, dtype=torch.long, device=device)
    centers = torch.zeros(B, k, D, dtype=dtype, device=device)
    inertia = torch.zeros(B, dtype=dtype, device=device)
    n_iter = torch.zeros(B, dtype=torch.long, device=device)
    dist_dtype = _resolve_dist_dtype(distance_dtype)
    kernel = _pick_kernel(backend, device, dtype, dist_dtype, D)
    if kernel is not None:
        finite = _fit_native(kernel, features, valid, w_all, given, u_first, u_trials, skipped, n_points,
                             k, t, metric, max_iter, tol, labels, centers, inertia, n_iter)
        if not bool(finite.all()):
            if nan_policy == "raise":
                raise _nonfinite_error((~finite).nonzero().flatten())
            skipped |= ~finite
        return KMeansResult(labels, centers, inertia, n_iter, skipped)
    elem = torch.finfo(dtype).bits // 8
    point_chunk = int(point_chunk or max(N, 1))
    # Extent of each instance: its points up to the last valid one (the rest is padding).
    has = valid.any(1)
    extent = torch.where(has, N - valid.flip(1).to(torch.int8).argmax(1), torch.zeros_like(has, dtype=torch.long))
    cache_blocked = device.type == "cpu" and max_chunk_bytes is None
    if cache_blocked:
        # Cache blocking: a chunk's features stay in cache through seeding and every Lloyd
        # iteration, so memory is read about once; points are blocked when one instance is larger.
        point_chunk = min(point_chunk, max(256, CPU_CACHE_BYTES // max(D * elem, 1)))
    elif chunk_size is None:
        if max_chunk_bytes is None:
            # Features are used in place; the budget only bounds gathers and temporaries.
            max_chunk_bytes = torch.cuda.mem_get_info(device)[0] // 4
        chunk_size = _auto_chunk(N, D, k, t, elem, max_chunk_bytes)

    def fit_chunk(chunk):
        idx, n = chunk
        # Contiguous chunks are views; sorted ones (and those dropping skipped instances) gather.
        feats, v, w = features[idx, :n], valid[idx, :n], w_all[idx, :n]
        if isinstance(idx, slice):
            idx = torch.arange(idx.start, idx.stop, device=device)
        x, aux, finite = _prepare(feats, v, metric, dtype)
        if not finite.all():
            bad = idx[~finite]
            if nan_policy == "raise":
                raise _nonfinite_error(bad, " in this chunk")
            skipped[bad] = True
            idx, x, w, aux, v = idx[finite], x[finite], w[finite], aux[finite], v[finite]
            if idx.numel() == 0:
                return
        lab, cen, ine, nit = _fit(
            x, aux, w, k, metric, None if given is None else given[idx], u_first[idx], u_trials[idx],
            max_iter, tol, point_chunk, dist_dtype,
        )
        labels[idx, :n] = torch.where(v, lab, torch.full_like(lab, -1))
        centers[idx], inertia[idx], n_iter[idx] = cen, ine, nit

    plan = _plan_chunks(extent, skipped, chunk_size,
                        CPU_CACHE_BYTES // max(D * elem, 1) if cache_blocked and chunk_size is None else None)
    threads = torch.get_num_threads() if cache_blocked else 1
    if threads > 1 and len(plan) > 1:
        # Cache-sized chunks are small ops: one chunk per thread (each op single-threaded, the GIL
        # released inside it) scales without the per-op fork/join that stalls on a busy machine.
        # Chunks write disjoint instances, so the result is the same as one at a time.
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(min(threads, len(plan))) as pool:
                list(pool.map(fit_chunk, plan))
        finally:
            torch.set_num_threads(threads)
    else:
        for chunk in plan:
            fit_chunk(chunk)
    return KMeansResult(labels, centers, inertia, n_iter, skipped)


def pad_packed(tensors, weights=None):
    """List of [n_i, D] tensors -> padded [B, N_max, D], valid [B, N_max] (and padded weights)."""
    if len(tensors) == 0:
        raise ValueError("pad_packed needs at least one tensor")
    lengths = torch.tensor([t.shape[0] for t in tensors], device=tensors[0].device)
    feats = torch.nn.utils.rnn.pad_sequence(list(tensors), batch_first=True)
    valid = torch.arange(feats.shape[1], device=feats.device)[None] < lengths[:, None]
    if weights is None:
        return feats, valid, None
    return feats, valid, torch.nn.utils.rnn.pad_sequence(list(weights), batch_first=True)


def batched_kmeans_packed(tensors, k=4, weights=None, **kwargs):
    """Convenience wrapper: a list of [n_i, D] tensors in, per-instance [n_i] labels out.

    Returns ``(labels_list, result)`` where ``result`` is the padded :class:`KMeansResult`.
    """
    feats, valid, w = pad_packed(tensors, weights)
    res = batched_kmeans(feats, valid, k=k, weights=w, **kwargs)
    return [res.labels[i, : t.shape[0]] for i, t in enumerate(tensors)], res


def dataset_kmeans(features, k=4, weights=None, point_chunk=1 << 16, **kwargs):
    """One k-means over all points [N, D] (dataset-level clustering, the one-stage baseline).

    Implemented as ``batched_kmeans`` with B=1; distances are computed ``point_chunk`` points at
    a time, so memory beyond the features themselves (never copied for float32/float64 input;
    cosine folds the inverse norms into the products) is O(N * (t + 2)) for k-means++ plus
    O(point_chunk * k) per block. ``init`` may be "k-means++" or centers [k, D].
    Returns labels [N], centers [k, D], inertia (0-d), n_iter (0-d), skipped (0-d bool).
    """
    if features.dim() != 2:
        raise ValueError(f"dataset_kmeans expects features [N, D], got {tuple(features.shape)}")
    init = kwargs.pop("init", "k-means++")
    if not isinstance(init, str):
        init = torch.as_tensor(init)[None]
    res = batched_kmeans(
        features[None], None, k=k, weights=None if weights is None else weights[None],
        init=init, point_chunk=point_chunk, chunk_size=1, **kwargs,
    )
    return KMeansResult(*(v[0] for v in res))


def assign(features, centers, metric="cosine", valid=None, skipped=None, point_chunk=1 << 16):
    """Label each point with its nearest center in ``metric`` (use the metric you fitted with).

    Typical use: fit at feature resolution, then assign the features upsampled to full mask
    resolution. ``features`` [B, M, D] with ``centers`` [B, k, D], or [M, D] with [k, D].
    ``valid`` ([B, M] mask or [B] lengths) and ``skipped`` ([B]) give label -1.
    """
    _check_metric(metric)
    single = features.dim() == 2
    if single:
        features, centers = features[None], centers[None]
        valid = None if valid is None else torch.as_tensor(valid)[None]
    if features.dim() != 3 or centers.dim() != 3 or features.shape[0] != centers.shape[0]:
        raise ValueError(
            f"assign expects features [B, M, D] and centers [B, k, D], got "
            f"{tuple(features.shape)} and {tuple(centers.shape)}"
        )
    B, M, _ = features.shape
    dtype = centers.dtype if centers.dtype in (torch.float32, torch.float64) else torch.float32
    mask = _valid_mask(valid, B, M, features.device)
    c = _normalize_centers(centers.to(features.device, dtype), metric)
    x, aux, finite = _prepare(features, mask, metric, dtype)
    if not finite.all():
        raise ValueError("assign: features of valid points contain NaN or inf")
    labels = _nearest(x, aux, c, metric, point_chunk)[0]
    if skipped is not None:
        mask = mask & ~torch.as_tensor(skipped, device=features.device)[:, None]
    labels = torch.where(mask, labels, torch.full_like(labels, -1))
    return labels[0] if single else labels


class BatchedKMeans:
    """Configurable front end of :func:`batched_kmeans` (reads ``cfg.MINING.*``).

    ``BatchedKMeans(cfg)`` or ``BatchedKMeans(num_clusters=4, metric="cosine", ...)``;
    ``fit(features, valid, weights=None, init=None)`` -> :class:`KMeansResult`,
    ``assign(features_full_res, centers, valid=None, skipped=None)`` -> labels.
    """

    @configurable
    def __init__(
        self,
        *,
        num_clusters=4,
        metric="cosine",
        max_iter=100,
        tol=1e-4,
        seed=0,
        min_points=0,
        nan_policy="raise",
        max_chunk_bytes=0,
        point_chunk=1 << 16,
        distance_dtype="",
        backend="auto",
    ):
        _check_metric(metric)
        _check_backend(backend)
        self.num_clusters = num_clusters
        self.metric = metric
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed
        self.min_points = min_points
        self.nan_policy = nan_policy
        self.max_chunk_bytes = max_chunk_bytes
        self.point_chunk = point_chunk
        self.distance_dtype = distance_dtype
        self.backend = backend

    @classmethod
    def from_config(cls, cfg):
        m = cfg.MINING
        return {
            "num_clusters": m.NUM_CLUSTERS,
            "metric": m.METRIC,
            "max_iter": m.MAX_ITER,
            "tol": m.TOL,
            "seed": m.SEED,
            "min_points": m.MIN_PIXELS,
            "nan_policy": m.NAN_POLICY,
            "max_chunk_bytes": m.CHUNK_BYTES,
            "point_chunk": m.POINT_CHUNK,
            "distance_dtype": m.DISTANCE_DTYPE,
            "backend": m.KMEANS_BACKEND,
        }

    def _kwargs(self):
        return dict(
            k=self.num_clusters, metric=self.metric, max_iter=self.max_iter, tol=self.tol,
            seed=self.seed, min_points=self.min_points, nan_policy=self.nan_policy,
            distance_dtype=self.distance_dtype, backend=self.backend,
        )

    def fit(self, features, valid=None, weights=None, init=None, generator=None, instance_seeds=None):
        """Instance-level clustering of [B, N, D] features (see :func:`batched_kmeans`)."""
        return batched_kmeans(
            features, valid, weights=weights, init="k-means++" if init is None else init,
            generator=generator, instance_seeds=instance_seeds,
            max_chunk_bytes=self.max_chunk_bytes or None, **self._kwargs(),
        )

    def fit_dataset(self, features, weights=None, init=None, generator=None):
        """Dataset-level clustering of [N, D] features pooled over images (see :func:`dataset_kmeans`)."""
        return dataset_kmeans(
            features, weights=weights, init="k-means++" if init is None else init,
            generator=generator, point_chunk=self.point_chunk, **self._kwargs(),
        )

    def assign(self, features, centers, valid=None, skipped=None):
        """Nearest-center labels in the fitting metric (e.g. at full mask resolution)."""
        return assign(features, centers, self.metric, valid=valid, skipped=skipped,
                      point_chunk=self.point_chunk)
