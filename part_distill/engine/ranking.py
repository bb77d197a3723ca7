"""Stage 3: fit the class-specific part prototypes over the whole dataset, on every rank.

Each rank gathers the candidate query features of its own images and writes them to
``<out>/candidates/rank{r}.npz``. Classes are then dealt to ranks by candidate count (largest
first, to the least loaded rank) and every rank runs the weighted k-means of its classes only;
the prototypes meet again through ``<out>/prototypes/rank{r}.npz``. Candidates are sorted by their
``(image_id, object_id, query_id)`` key before fitting and every class has its own seed, so the
result does not depend on the number of ranks. The handover goes through files, so ``<out>``
must be on a filesystem all ranks see (as detectron2's OUTPUT_DIR is in multi-node runs).
"""
import logging
import os

import numpy as np
import torch
from detectron2.utils import comm

from ..mining.kmeans import batched_kmeans
from ..utils.io import atomic_open

logger = logging.getLogger(__name__)


def _save_npz(path, **arrays):
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def deal_classes_to_ranks(counts, world_size):
    """Greedy longest-processing-time assignment: class -> rank, balancing total candidates."""
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
    res = batched_kmeans(
        x[None], k=k_eff, metric=metric, max_iter=max_iter, tol=tol, seed=seed, weights=w[None]
    )
    return res.centers[0]


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
):
    """Fit per-class prototypes with every rank working; call on all ranks with their own candidates.

    Args:
        features: [n, D] float array of this rank's candidate query features.
        object_classes: [n] object class of each candidate.
        weights: [n] k-means sample weights (e.g. score x area ratio).
        keys: [n, 3] int64 (image_id, object_id, query_id), a canonical order for determinism.
        num_classes, k: number of object classes and prototypes per class.
        min_candidates: classes with fewer candidates get no prototypes (reported).

    Returns:
        (prototypes: dict class -> FloatTensor [k', D], report: dict with per-class counts and
        the classes left without prototypes). Identical on every rank.
    """
    rank, world = comm.get_rank(), comm.get_world_size()
    cand_dir = os.path.join(output_dir, "candidates")
    proto_dir = os.path.join(output_dir, "prototypes")
    features = np.asarray(features, dtype=np.float32)
    dim = features.shape[1] if features.ndim == 2 else 0
    object_classes = np.asarray(object_classes, dtype=np.int64).reshape(-1)
    cand_path = os.path.join(cand_dir, f"rank{rank}.npz")
    _save_npz(
        cand_path,
        features=features.reshape(len(object_classes), -1),
        classes=object_classes,
        weights=np.asarray(weights, dtype=np.float32).reshape(-1),
        keys=np.asarray(keys, dtype=np.int64).reshape(-1, 3),
    )
    counts_local = np.bincount(object_classes[object_classes >= 0], minlength=num_classes)
    counts = np.sum(comm.all_gather(counts_local), axis=0).tolist()
    dims = [d for d in comm.all_gather(dim) if d]
    comm.synchronize()

    owner = deal_classes_to_ranks(counts, world)
    mine = [c for c in range(num_classes) if owner[c] == rank and counts[c] >= max(min_candidates, 1)]
    local = {}
    if mine:
        shards = [np.load(os.path.join(cand_dir, f"rank{r}.npz")) for r in range(world)]
        for c in mine:
            parts = [(s["features"][s["classes"] == c], s["weights"][s["classes"] == c],
                      s["keys"][s["classes"] == c]) for s in shards]
            f = np.concatenate([p[0] for p in parts])
            w = np.concatenate([p[1] for p in parts])
            kk = np.concatenate([p[2] for p in parts])
            order = np.lexsort(kk.T[::-1])
            local[c] = fit_class_prototypes(f[order], w[order], k, seed + c, metric, max_iter).numpy()
    _save_npz(
        os.path.join(proto_dir, f"rank{rank}.npz"),
        **{f"class_{c}": v for c, v in local.items()},
    )
    comm.synchronize()

    prototypes = {}
    for r in range(world):
        with np.load(os.path.join(proto_dir, f"rank{r}.npz")) as z:
            for name in z.files:
                prototypes[int(name.split("_")[1])] = torch.from_numpy(z[name])
    unfitted = [c for c in range(num_classes) if c not in prototypes]
    report = {
        "candidates_per_class": [int(x) for x in counts],
        "classes_without_prototypes": unfitted,
        "feature_dim": dims[0] if dims else 0,
        "world_size": world,
    }
    if unfitted:
        logger.warning(
            "Part ranking: %d/%d object classes had fewer than %d candidates and get no prototypes: %s",
            len(unfitted), num_classes, max(min_candidates, 1), unfitted,
        )
    return prototypes, report
