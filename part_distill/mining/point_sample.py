"""A bounded, seeded per-class sample of feature points for dataset-level k-means.

Dataset-level mining (miner.py, MINING.LEVEL "dataset") fits one k-means per object class on at
most MINING.DATASET_MAX_POINTS points of the class. Holding every point of the dataset until the
fit would grow with the dataset; :class:`ClassPointSample` instead keeps, per class, the ``cap``
points with the smallest random keys, where a point's key depends only on (seed, image index,
object, row). That is a uniform sample without replacement (a "bottom-k" sample), the same whatever
the batching, order or number of ranks: merging the samples of two ranks and keeping the smallest
keys again gives the sample of the whole. Memory is at most 2 x ``cap`` points per class while
collecting. With ``cap`` 0, or a class with fewer points, every point is kept. The points of a
class leave in (image index, object, row) order, so the k-means input does not depend on the
collection order either.
"""
from collections import defaultdict

import numpy as np
import torch

__all__ = ["ClassPointSample"]


def _object_seed(seed, index, j):
    return int(np.random.SeedSequence([int(seed), 1 << 31, int(index), int(j)]).generate_state(1)[0])


class ClassPointSample:
    def __init__(self, cap, seed):
        self.cap = int(cap)
        self.seed = int(seed)
        self.num_objects = 0
        # class -> list of (order [n, 3] int64 (index, object, row), keys [n] float64, points [n, D], weights [n])
        self._chunks = defaultdict(list)
        self._held = defaultdict(int)

    def add(self, index, j, category_id, points, weights):
        """The weighted points [n, D] of object ``j`` of image ``index``."""
        n = len(points)
        order = torch.stack([torch.full((n,), int(index)), torch.full((n,), int(j)), torch.arange(n)], 1)
        keys = torch.rand(n, generator=torch.Generator().manual_seed(_object_seed(self.seed, index, j)),
                          dtype=torch.float64)
        self._append(category_id, (order, keys, points, weights))
        self.num_objects += 1

    def add_records(self, records):
        """``[(index, object, category_id, points, weights)]`` (PartMiner.collect_batch's output)."""
        for index, j, cat, p, w in records:
            self.add(index, j, cat, p, w)
        return self

    def _append(self, cat, chunk):
        self._chunks[cat].append(chunk)
        self._held[cat] += len(chunk[1])
        if self.cap and self._held[cat] > 2 * self.cap:
            self._shrink(cat)

    def _shrink(self, cat):
        order, keys, points, weights = self._joined(cat)
        if self.cap and len(keys) > self.cap:
            keep = torch.topk(keys, self.cap, largest=False).indices
            order, keys, points, weights = order[keep], keys[keep], points[keep], weights[keep]
        self._chunks[cat] = [(order, keys, points, weights)]
        self._held[cat] = len(keys)

    def _joined(self, cat):
        chunks = self._chunks[cat]
        return tuple(torch.cat([c[i] for c in chunks]) for i in range(4))

    def state(self):
        """Picklable contents (bounded by cap per class), for :meth:`merge` on another rank."""
        for cat in list(self._chunks):
            self._shrink(cat)
        return {"num_objects": self.num_objects, "classes": {c: ch[0] for c, ch in self._chunks.items()}}

    def merge(self, state):
        for cat, chunk in state["classes"].items():
            self._append(cat, chunk)
        self.num_objects += state["num_objects"]
        return self

    def classes(self):
        return sorted(self._chunks)

    def points(self, cat):
        """(points [m, D], weights [m]) of class ``cat``: its sample in (image index, object, row) order."""
        self._shrink(cat)
        order, _, points, weights = self._chunks[cat][0]
        rank = np.lexsort(order.numpy().T[::-1])  # by index, then object, then row
        rank = torch.from_numpy(rank)
        return points[rank], weights[rank]
