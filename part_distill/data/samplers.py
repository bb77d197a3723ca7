"""A TrainingSampler whose infinite stream can start part-way, so a resumed run continues it.

detectron2's TrainingSampler yields ``shuffle(range(n)) + shuffle(range(n)) + ...`` from one torch
generator seeded once; rank r takes every world-size-th index from r. A restarted process would
replay that stream from its first index (and, with a seed drawn by ``comm.shared_random_seed``,
a different stream). :class:`ResumableTrainingSampler` yields the very same stream for the same
seed, but from global position ``start``: the trainer sets ``start`` = iterations done x total batch
size and restores ``seed`` from the checkpoint (engine/trainer.py), so the indices after a resume
are those the uninterrupted run would have drawn.
"""
import itertools

import torch
from detectron2.data.samplers import TrainingSampler

__all__ = ["ResumableTrainingSampler"]

_CHUNK = 4096


class ResumableTrainingSampler(TrainingSampler):
    """TrainingSampler(size, shuffle, seed) starting at global stream position ``start``."""

    def __init__(self, size, shuffle=True, seed=None, start=0):
        super().__init__(size, shuffle=shuffle, seed=seed)
        self.start = int(start)

    @property
    def seed(self):
        return self._seed

    @seed.setter
    def seed(self, value):
        self._seed = int(value)

    def __iter__(self):
        yield from itertools.islice(self._indices_from(self.start), self._rank, None, self._world_size)

    def _indices_from(self, start):
        g = torch.Generator()
        g.manual_seed(self._seed)
        epoch, offset = divmod(start, self._size)
        # Whole epochs are drawn and dropped as tensors: the generator has no cheaper way to skip.
        for _ in range(epoch if self._shuffle else 0):
            torch.randperm(self._size, generator=g)
        while True:
            perm = torch.randperm(self._size, generator=g) if self._shuffle else torch.arange(self._size)
            # In chunks: a Python list of the whole epoch costs 36 bytes per image, the tensor 8.
            for chunk in perm[offset:].split(_CHUNK):
                yield from chunk.tolist()
            offset = 0
