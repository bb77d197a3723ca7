"""Stage 3: fit the class-specific part prototypes over the whole dataset, on every rank, in bounded memory.

Candidates come from a :class:`~part_distill.engine.candidate_store.CandidateStore`: chunks whose
rows are sorted by class bucket (class c in bucket ``c % num_buckets``). Buckets are dealt to ranks
by candidate count (largest first, to the least loaded rank); a rank streams the slices of its
buckets from every chunk, once, keeping per class at most ``max_samples`` candidates: those of the
smallest seeded hash of their ``(image, object, query)`` key (a deterministic reservoir: the sample
is a function of the candidate set, not of the reading order or the world size). Each class's
sample, in key order, gets a weighted k-means with its own seed (``seed + c``); the classes of a
bucket are clustered together in padded batches (``batched_kmeans``), since the per-call overhead,
not the arithmetic, dominates k-means of a few hundred points. Cluster sizes (for the report) come
from the fit's final assignment; for a class fitted on a sample, a second streamed pass assigns all
its candidates to their nearest prototype. One ``prototypes/bucket_XXXX.npz`` per
bucket carries the result, so the output does not depend on the number of ranks, and a rerun skips
the buckets already fitted with the same configuration and candidates. ``<out>`` must be on a
filesystem all ranks see (as detectron2's OUTPUT_DIR is in multi-node runs).

Cost: one read of the candidates in total (divided over the ranks), plus a second one of the classes
fitted on a sample; k-means per class on at most ``max_samples`` points. Memory of a rank is bounded
by ``sum_c min(count_c, max_samples)`` records of its largest bucket, not by the candidates.
"""
import logging
import os
import zipfile

import numpy as np
import torch
from detectron2.utils import comm

from ..mining.kmeans import batched_kmeans
from ..mining.store import config_hash
from ..utils.io import atomic_open, remove_stale_temps
from .candidate_store import CandidateStore

__all__ = ["deal_classes_to_ranks", "fit_class_prototypes", "sample_priority", "fit_store_prototypes",
           "fit_prototypes_distributed"]

logger = logging.getLogger(__name__)

# Test hook: called with the number of buckets this process has fitted after each one.
_after_bucket_hook = None
# Points (classes x padded candidates) of one k-means batch: bounds its memory (x D x 4 bytes).
_BATCH_POINTS = 1 << 16
# Padded points one more k-means call is worth (its fixed cost, ~3.5 ms on one CPU core at 256 d):
# a batch stops growing when the next class would add more padding than this.
_PAD_POINTS = 512
_ASSIGN_ROWS = 4096


def deal_classes_to_ranks(counts, world_size):
    """Greedy longest-processing-time assignment: item -> rank, balancing total candidates."""
    load = [0] * world_size
    owner = {}
    for c in sorted(range(len(counts)), key=lambda c: (-counts[c], c)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[c] = r
        load[r] += counts[c]
    return owner


def fit_class_prototypes(features, weights, k, seed, metric="l2", max_iter=100, tol=1e-4):
    """Weighted k-means of one class's candidate features [n, D]; returns centers [min(k, n), D]."""
    x = torch.as_tensor(features, dtype=torch.float32)
    w = torch.as_tensor(weights, dtype=torch.float32)
    k_eff = min(k, x.shape[0])
    res = batched_kmeans(x[None], k=k_eff, metric=metric, max_iter=max_iter, tol=tol,
                         instance_seeds=[seed], weights=w[None])
    return res.centers[0]


_U64 = np.uint64
_GOLDEN, _M1, _M2 = _U64(0x9E3779B97F4A7C15), _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)


def _splitmix(z):
    z = (z ^ (z >> _U64(30))) * _M1
    z = (z ^ (z >> _U64(27))) * _M2
    return z ^ (z >> _U64(31))


def sample_priority(keys, seed):
    """uint64 priority of each [n, 3] key: candidates of the smallest priorities form a class's sample."""
    keys = np.asarray(keys, dtype=np.int64).reshape(-1, 3).view(np.uint64)
    with np.errstate(over="ignore"):
        z = np.full(len(keys), _U64(seed & 0xFFFFFFFFFFFFFFFF), dtype=np.uint64)
        for j in range(3):
            z = _splitmix(z ^ (keys[:, j] + _GOLDEN * _U64(j + 1)))
    return z


def _key_order(rows, *first):
    k = rows["key"]
    return np.lexsort((k[:, 2], k[:, 1], k[:, 0], *first))


def _trim(rows, cap, seed):
    """Keep per class the ``cap`` rows of smallest priority (ties broken by key)."""
    if cap <= 0 or len(rows) == 0 or np.bincount(rows["cls"]).max() <= cap:
        return rows
    order = _key_order(rows, sample_priority(rows["key"], seed), rows["cls"])
    rows = rows[order]
    cls = rows["cls"]
    start = np.flatnonzero(np.r_[True, cls[1:] != cls[:-1]])
    rank_in_class = np.arange(len(rows)) - np.repeat(start, np.diff(np.r_[start, len(rows)]))
    return rows[rank_in_class < cap]


def _sample_bucket(store, ranges, classes, counts, cap, seed):
    """Stream one bucket's slices of every chunk; returns its sampled records in (class, key) order."""
    wanted = np.zeros(int(max(classes)) + 1, bool)
    wanted[classes] = True
    bound = int(sum(min(counts[c], cap) if cap > 0 else counts[c] for c in classes))
    limit = max(bound, 1 << 15)
    kept, pending, n_pending = [], [], 0
    for chunk, (s, e) in enumerate(ranges):
        rows = store.read_rows(chunk, int(s), int(e))
        if rows is None:
            continue
        cls = rows["cls"]
        rows = rows[(cls < len(wanted)) & wanted[np.minimum(cls, len(wanted) - 1)]]
        pending.append(rows)
        n_pending += len(rows)
        if n_pending > limit:  # amortised: each merge at least halves the rows held
            kept, pending, n_pending = [_trim(np.concatenate(kept + pending), cap, seed)], [], 0
    rows = _trim(np.concatenate(kept + pending), cap, seed) if (kept or pending) else None
    if rows is None or not len(rows):
        return rows
    return rows[_key_order(rows, rows["cls"])]


def _fit_bucket_kmeans(rows, k, seed, metric, max_iter):
    """Weighted k-means of every class in ``rows`` (sorted by class, key), in padded batches.

    Returns {class: (centers [k', D], cluster sizes [k'] of its rows)}; a class whose positive-weight
    candidates number n < k gets k' = n, one with none gets nothing. The sizes are the final E-step's,
    i.e. every row's nearest prototype.
    """
    cls = rows["cls"]
    start = np.flatnonzero(np.r_[True, cls[1:] != cls[:-1]])
    stop = np.r_[start[1:], len(rows)]
    groups = []
    for s, e in zip(start, stop):
        n_pos = int((rows["weight"][s:e] > 0).sum())
        if n_pos:
            groups.append((min(k, n_pos), e - s, int(cls[s]), s, e))
    groups.sort()
    out = {}
    b = 0
    while b < len(groups):
        k_eff = groups[b][0]
        e = b + 1
        # Sorted by size: the last class of a batch is its longest, so the padding stays small.
        while e < len(groups) and groups[e][0] == k_eff and (e - b + 1) * groups[e][1] <= _BATCH_POINTS:
            # Padding the classes already in the batch up to this one's size costs more than a new call?
            if (e - b) * (groups[e][1] - groups[e - 1][1]) > _PAD_POINTS:
                break
            e += 1
        batch = groups[b:e]
        n_max = batch[-1][1]
        dim = rows["feature"].shape[1]
        x = torch.zeros(len(batch), n_max, dim)
        w = torch.zeros(len(batch), n_max)
        for i, (_, n, _, s, stop_) in enumerate(batch):
            x[i, :n] = torch.from_numpy(rows["feature"][s:stop_].astype(np.float32))
            w[i, :n] = torch.from_numpy(rows["weight"][s:stop_])
        lengths = torch.tensor([g[1] for g in batch])
        res = batched_kmeans(x, lengths, k=k_eff, metric=metric, max_iter=max_iter, tol=1e-4, weights=w,
                             instance_seeds=[seed + g[2] for g in batch])
        for i, g in enumerate(batch):
            lab = res.labels[i, :g[1]]
            out[g[2]] = (res.centers[i].numpy(), torch.bincount(lab[lab >= 0], minlength=k_eff).numpy())
        b = e
    return out


def _cluster_sizes(store, ranges, classes, centers, k):
    """Streamed assignment of every candidate of ``classes`` in a bucket to its class's nearest prototype
    -> [m, k] counts (run for the classes fitted on a sample; the others' sizes come with their fit)."""
    m = len(classes)
    sizes = np.zeros((m, k), np.int64)
    if not m:
        return sizes
    pos = np.full(int(classes.max()) + 1, -1, np.int64)
    pos[classes] = np.arange(m)
    c = torch.from_numpy(centers)
    for chunk, (s, e) in enumerate(ranges):
        rows = store.read_rows(chunk, int(s), int(e))
        if rows is None:
            continue
        cls = rows["cls"]
        p = np.where(cls < len(pos), pos[np.minimum(cls, len(pos) - 1)], -1)
        rows, p = rows[p >= 0], p[p >= 0]
        for a in range(0, len(rows), _ASSIGN_ROWS):
            x = torch.from_numpy(rows["feature"][a:a + _ASSIGN_ROWS].astype(np.float32))
            pi = torch.from_numpy(p[a:a + _ASSIGN_ROWS])
            cc = c[pi]  # [n, k, D]; unfitted slots hold +inf so they never win
            d = ((x[:, None, :] - cc) ** 2).sum(-1)
            np.add.at(sizes, (pi.numpy(), d.argmin(1).numpy()), 1)
    return sizes


def _save_npz(f, **arrays):
    """np.savez with fixed zip timestamps: the same arrays always give the same bytes."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, a in arrays.items():
            with z.open(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), "w", force_zip64=True) as out:
                np.lib.format.write_array(out, np.asanyarray(a), allow_pickle=False)


def _bucket_path(proto_dir, b):
    return os.path.join(proto_dir, f"bucket_{b:04d}.npz")


def _load_bucket(path, fit_hash):
    """The bucket file's arrays if it is sound and was fitted with ``fit_hash``; a damaged one is named."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {n: z[n] for n in z.files}
        if str(data["config_hash"]) != fit_hash:
            return None
        missing = {"classes", "centers", "num_centers", "sampled", "cluster_sizes"} - set(data)
        if missing:
            raise KeyError(f"arrays {sorted(missing)} missing")
        return data
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        logger.warning("Part ranking: %s is damaged (%s); its classes are fitted again", path, e)
        return None


def fit_store_prototypes(store, num_chunks, num_classes, k, output_dir, seed=0, min_candidates=1, metric="l2",
                         max_iter=100, max_samples=0):
    """Fit per-class prototypes of a complete CandidateStore with every rank working; call on all ranks.

    Args:
        store, num_chunks: the candidates (their manifest must be written).
        num_classes, k: number of object classes and prototypes per class.
        output_dir: ``prototypes/`` is written here.
        min_candidates: classes with fewer candidates get no prototypes (reported).
        max_samples: a class with more candidates is fitted on this many (0 = all).

    Returns:
        (prototypes: dict class -> FloatTensor [k', D], report: dict with per-class counts, cluster
        sizes and the classes left without prototypes). Identical on every rank.
    """
    rank, world = comm.get_rank(), comm.get_world_size()
    manifest = store.read_manifest()
    counts = manifest["class_counts"]
    if len(counts) != num_classes:
        raise ValueError(f"{store.root}: candidates of {len(counts)} classes, the ranker has {num_classes}")
    fit_info = {"k": int(k), "seed": int(seed), "min_candidates": int(min_candidates), "metric": metric,
                "max_iter": int(max_iter), "max_samples": int(max_samples), "num_buckets": store.num_buckets,
                "candidates": manifest["content_hash"]}
    fit_hash = config_hash(fit_info)
    proto_dir = os.path.join(output_dir, "prototypes")
    if comm.is_main_process():
        os.makedirs(proto_dir, exist_ok=True)
        remove_stale_temps(proto_dir)
    comm.synchronize()

    owner = deal_classes_to_ranks(manifest["bucket_counts"], world)
    todo = [b for b in range(store.num_buckets)
            if owner[b] == rank and _load_bucket(_bucket_path(proto_dir, b), fit_hash) is None]
    ranges = store.bucket_offsets(num_chunks, todo) if todo else None
    dim = manifest["feature_dim"]
    for n_done, (b, bucket_ranges) in enumerate(zip(todo, ranges.transpose(1, 0, 2) if todo else []), 1):
        classes = np.array([c for c in range(b, num_classes, store.num_buckets)
                            if counts[c] >= max(min_candidates, 1)], np.int64)
        fitted = {}
        if len(classes):
            rows = _sample_bucket(store, bucket_ranges, classes, counts, max_samples, seed)
            fitted = _fit_bucket_kmeans(rows, k, seed, metric, max_iter) if rows is not None else {}
        fc = np.array(sorted(fitted), np.int64)
        centers = np.full((len(fc), k, dim), np.inf, np.float32)
        sizes = np.zeros((len(fc), k), np.int64)
        for i, c in enumerate(fc.tolist()):
            centers[i, :len(fitted[c][0])] = fitted[c][0]
            sizes[i, :len(fitted[c][1])] = fitted[c][1]
        sampled = np.array([min(counts[c], max_samples) if max_samples > 0 else counts[c] for c in fc], np.int64)
        part = np.flatnonzero(sampled < np.asarray([counts[c] for c in fc.tolist()], np.int64))
        if len(part):
            sizes[part] = _cluster_sizes(store, bucket_ranges, fc[part], centers[part], k)
        with atomic_open(_bucket_path(proto_dir, b), "wb") as f:
            _save_npz(f, config_hash=np.array(fit_hash), classes=fc, centers=centers,
                     num_centers=np.array([len(fitted[c][0]) for c in fc.tolist()], np.int64),
                     sampled=sampled, cluster_sizes=sizes)
        if _after_bucket_hook is not None:
            _after_bucket_hook(n_done)
    comm.synchronize()

    prototypes, cluster_sizes, n_sampled = {}, {}, 0
    for b in range(store.num_buckets):
        data = _load_bucket(_bucket_path(proto_dir, b), fit_hash)
        if data is None:
            raise RuntimeError(f"Part ranking: {_bucket_path(proto_dir, b)} is missing or stale after every rank "
                               "finished; is OUTPUT_DIR on a filesystem all ranks share?")
        for c, cen, nc, smp, sz in zip(data["classes"].tolist(), data["centers"], data["num_centers"].tolist(),
                                       data["sampled"].tolist(), data["cluster_sizes"]):
            prototypes[c] = torch.from_numpy(np.ascontiguousarray(cen[:nc]))
            cluster_sizes[str(c)] = sz[:nc].tolist()
            n_sampled += int(smp < counts[c])
    unfitted = [c for c in range(num_classes) if c not in prototypes]
    report = {
        "candidates_per_class": [int(x) for x in counts],
        "classes_without_prototypes": unfitted,
        "cluster_sizes": cluster_sizes,
        "classes_fitted_on_a_sample": n_sampled,
        "max_samples_per_class": int(max_samples),
        "feature_dim": int(dim),
        "feature_dtype": store.feature_dtype,
        "world_size": world,
    }
    if unfitted:
        few = [c for c in unfitted if counts[c] < max(min_candidates, 1)]
        report["warning"] = (
            f"{len(unfitted)} of {num_classes} object classes have NO prototype, so their parts stay unranked "
            f"(stage 4 drops them): {len(few)} with fewer than {max(min_candidates, 1)} candidates, "
            f"{len(unfitted) - len(few)} whose candidates all weigh 0; classes {unfitted[:50]}"
            + (" ..." if len(unfitted) > 50 else ""))
        logger.warning("Part ranking: %s", report["warning"])
    return prototypes, report


def fit_prototypes_distributed(
    features,
    object_classes,
    weights,
    keys,
    num_classes,
    k,
    output_dir,
    seed=0,
    min_candidates=1,
    metric="l2",
    max_iter=100,
    max_samples=0,
    num_buckets=32,
    feature_dtype="float16",
):
    """In-memory front end of :func:`fit_store_prototypes`: each rank hands in its own candidates.

    Args:
        features: [n, D] float array of this rank's candidate query features.
        object_classes: [n] object class of each candidate.
        weights: [n] k-means sample weights (e.g. score x area ratio).
        keys: [n, 3] int64 (image_id, object_id, query_id), unique, a canonical order for determinism.

    Rank r's candidates become chunk r of ``<output_dir>/candidates``; the rest is
    :func:`fit_store_prototypes` (buckets are ``min(num_buckets, num_classes)``).
    """
    rank, world = comm.get_rank(), comm.get_world_size()
    store = CandidateStore(os.path.join(output_dir, "candidates"), min(num_buckets, max(num_classes, 1)),
                           feature_dtype)
    run_info = {"config": {"source": "in-memory", "world_size": world}}
    run_info["config_hash"] = config_hash(run_info)
    if comm.is_main_process():
        os.makedirs(store.root, exist_ok=True)
        remove_stale_temps(store.root)
    comm.synchronize()
    features = np.asarray(features, dtype=np.float32)
    store.write_chunk(rank, features.reshape(len(np.asarray(object_classes).reshape(-1)), -1), object_classes,
                      weights, keys, run_info["config_hash"], num_classes)
    comm.synchronize()
    if comm.is_main_process():
        store.write_manifest(run_info, world, num_classes)
    comm.synchronize()
    return fit_store_prototypes(store, world, num_classes, k, output_dir, seed, min_candidates, metric, max_iter,
                                max_samples)
