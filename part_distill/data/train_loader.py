"""The train loader of every stage: part stores streamed, a resumable sampler, no per-image Python state.

detectron2's ``build_detection_train_loader(cfg)`` loads every dict of DATASETS.TRAIN into a list
and wraps it in ``MapDataset``, whose retry pool is a Python set of all indices (~70 bytes per
image, in every process). Here part stores (names registered by ``register_pseudo_labels``) are
read through :class:`~part_distill.data.store_dataset.StoreDataset`, other datasets load their
dicts as detectron2 does, and :class:`MapWithRetry` applies the mapper without that set.
"""
import logging
import random

import torch.utils.data as torchdata
from detectron2.data import DatasetFromList, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.utils import comm
from detectron2.utils.serialize import PicklableWrapper

from .mappers import build_dataset_mapper
from .samplers import ResumableTrainingSampler
from .store_dataset import build_store_train_set

__all__ = ["MapWithRetry", "build_train_loader"]

logger = logging.getLogger(__name__)


class MapWithRetry(torchdata.Dataset):
    """``mapper(dataset[i])``; where the mapper returns None, a seeded random other index instead
    (as detectron2's MapDataset), remembering only the indices that failed."""

    def __init__(self, dataset, mapper, seed=42):
        self._dataset = dataset
        self._mapper = PicklableWrapper(mapper)  # a lambda still pickles into loader workers
        self._rng = random.Random(seed)
        self._failed = set()

    def __len__(self):
        return len(self._dataset)

    def __getitem__(self, idx):
        cur = int(idx)
        for attempt in range(1, 1 << 30):
            data = self._mapper(self._dataset[cur])
            if data is not None:
                return data
            self._failed.add(cur)
            if len(self._failed) >= len(self):
                raise RuntimeError(f"the mapper returned None for every one of the {len(self)} training images")
            if attempt >= 3:
                logger.warning("the mapper failed on index %d (%d attempts)", idx, attempt)
            while cur in self._failed:
                cur = self._rng.randrange(len(self))


def build_train_loader(cfg, mapper=None):
    """detectron2's train loader over DATASETS.TRAIN, streaming part stores and resumable.

    With DATALOADER.SAMPLER_TRAIN "TrainingSampler" the sampler is a ResumableTrainingSampler (the
    same stream as detectron2's), reachable as ``loader.stream_sampler`` for the trainer's resume.
    """
    names = cfg.DATASETS.TRAIN
    filter_empty = cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    dataset = build_store_train_set(names, drop_empty=filter_empty, collective=True)
    if dataset is None:
        dataset = DatasetFromList(get_detection_dataset_dicts(names, filter_empty=filter_empty), copy=False)
    elif len(dataset) == 0:
        raise ValueError(f"no training image of {list(names)} keeps a part after the DATASETS.PSEUDO_LABELS "
                         "filters (and DATALOADER.FILTER_EMPTY_ANNOTATIONS)")
    mapper = mapper or build_dataset_mapper(cfg, is_train=True)
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        # detectron2 builds the other samplers from cfg (RepeatFactor... read the dicts); not resumable.
        loader = build_detection_train_loader(cfg, mapper=mapper, dataset=dataset)
        loader.stream_sampler = None
        return loader
    # cfg.SEED fixes the sample order (detectron2 draws a shared random seed when it is None) and the
    # loader's own generator, so making its iterator draws nothing from the global RNGs (exact resumes,
    # engine/resume_state.py).
    fixed = cfg.SEED >= 0
    sampler = ResumableTrainingSampler(len(dataset), seed=cfg.SEED if fixed else None)
    loader = build_detection_train_loader(MapWithRetry(dataset, mapper), mapper=None, sampler=sampler,
                                          total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
                                          aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
                                          num_workers=cfg.DATALOADER.NUM_WORKERS,
                                          seed=cfg.SEED + comm.get_rank() if fixed else None)
    loader.stream_sampler = sampler
    return loader
