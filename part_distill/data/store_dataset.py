"""Part stores as map-style training sets whose memory does not grow with the number of images.

``load_pseudo_labels`` builds one Python dict per image with every RLE mask of the store, on every
rank and (copy-on-write aside) every loader worker. :class:`StoreDataset` instead scans each shard
once, keeps per image only where its records lie in the shard file (one row of a numpy structured
array, :data:`INDEX_DTYPE`, 40 bytes) plus one path per shard, and decodes an image's own bytes
(its image record, its parts, its objects) when the sampler asks for it; the index is cached in the
store (``stream_index/``, memory-mapped by later runs). The dicts it returns are
those of ``load_pseudo_labels`` (same filters, same order); images left without parts are dropped
at scan time when ``drop_empty`` (detectron2's DATALOADER.FILTER_EMPTY_ANNOTATIONS, which the
list path applies in ``get_detection_dataset_dicts``), so index i is the same image in both paths
and any detectron2 sampler (TrainingSampler, RandomSubsetTrainingSampler, ...) draws the same stream.
"""
import logging
import os

import numpy as np
import torch.utils.data as torchdata
from detectron2.data import MetadataCatalog
from detectron2.utils import comm

from ..mining.store import PartStore, config_hash, read_manifest, read_span, scan_shard
from ..utils.io import atomic_open
from .pseudo_labels import PseudoLabelFilters, check_cluster_store, check_shard, image_blocks, image_dict, store_root

__all__ = ["INDEX_DTYPE", "StoreDataset", "build_store_train_set", "is_store_dataset"]

logger = logging.getLogger(__name__)

# One row per image: its shard and the byte (start, length) of its image record, of its consecutive
# part records and of its consecutive object records in that shard.
INDEX_DTYPE = np.dtype([("shard", np.int32), ("image", np.int64), ("image_len", np.int32),
                        ("parts", np.int64), ("parts_len", np.int32), ("objects", np.int64),
                        ("objects_len", np.int32)], align=False)
# Bump when the rows or the filters' meaning change: cached indexes of older code are then ignored.
INDEX_VERSION = 1
INDEX_DIR = PartStore.STREAM_INDEX


class StoreDataset(torchdata.Dataset):
    """The filtered training dicts of one store (manifest.json or its directory), decoded on demand."""

    def __init__(self, manifest_path, filters=PseudoLabelFilters(), cluster_slots=0, part_labels=False,
                 drop_empty=True, cache=True, collective=False):
        """``cache``: keep the index in ``<store>/stream_index/`` (written by the main process), so the
        next run, rank or training round maps it instead of scanning every shard again.

        ``collective``: every rank builds this dataset together (as detectron2 builds train loaders);
        without a cached index each then scans its share of the shards and the rows are gathered.
        """
        manifest = read_manifest(manifest_path)
        if cluster_slots:
            check_cluster_store(manifest, cluster_slots)
        self.root = store_root(manifest_path)
        self.filters = PseudoLabelFilters(*filters)
        self.cluster_slots = int(cluster_slots)
        self.part_labels = bool(part_labels)
        self.shard_paths = [os.path.join(self.root, e["file"]) for e in manifest["shards"]]
        # Shard sizes too: a shard rewritten in place (same manifest) must not reuse stale offsets.
        key = config_hash([INDEX_VERSION, manifest["config_hash"], [[e["file"], e["images"], e["parts"]]
                           for e in manifest["shards"]], [os.path.getsize(p) for p in self.shard_paths],
                           list(self.filters), self.cluster_slots, self.part_labels, bool(drop_empty)])
        self.index_path = os.path.join(self.root, INDEX_DIR, f"index_{key}.npy")
        if cache and os.path.isfile(self.index_path):
            # Mapped, not read: the pages are shared by every process of the machine that uses the store.
            self.index = np.load(self.index_path, mmap_mode="r")
            logger.info("Streaming pseudo-labels %s: %d images (index %s)", self.root, len(self.index), self.index_path)
            return
        self.index = self._scan(manifest, drop_empty, collective)
        if cache and comm.is_main_process():
            try:
                with atomic_open(self.index_path, "wb") as f:
                    np.save(f, self.index)
            except OSError as e:
                logger.warning("could not cache the stream index of %s (%s): the next run scans it again",
                               self.root, e)

    def _scan(self, manifest, drop_empty, collective):
        rank, world = (comm.get_rank(), comm.get_world_size()) if collective else (0, 1)
        dropped, stats = {"small_object": 0, "small_part": 0, "large_part": 0}, [0, 0]
        mine = {s: self._index_shard(s, self.shard_paths[s], manifest, dropped, stats, drop_empty)
                for s in range(rank, len(self.shard_paths), world)}
        if world > 1:
            parts = comm.all_gather((mine, dropped, stats))
            mine = {s: rows for m, _, _ in parts for s, rows in m.items()}
            dropped = {k: sum(d[k] for _, d, _ in parts) for k in dropped}
            stats = [sum(st[i] for _, _, st in parts) for i in range(2)]
        index = np.concatenate([mine[s] for s in range(len(self.shard_paths))]) if mine else np.zeros(0, INDEX_DTYPE)
        logger.info("Streaming pseudo-labels %s: %d of %d images (%d without parts dropped), %d parts kept, "
                    "dropped %s (filters %s); index %.1f MB", self.root, len(index), stats[0],
                    stats[0] - len(index), stats[1], dropped,
                    dict(self.filters._asdict()), index.nbytes / 1e6)
        return index

    def _index_shard(self, s, path, manifest, dropped, stats, drop_empty):
        shard, spans = scan_shard(path)
        check_shard(shard, manifest, path)
        out = np.zeros(len(shard["images"]), INDEX_DTYPE)
        n = 0
        for i, (img, (a0, a1), (o0, o1)) in enumerate(image_blocks(shard, path)):
            d = self._dict(img, shard["annotations"][a0:a1], shard["objects"][o0:o1], dropped)
            stats[0] += 1
            if drop_empty and not d["annotations"]:
                continue
            stats[1] += len(d["annotations"])
            out[n] = (s, *_span(spans["images"], i, i + 1), *_span(spans["annotations"], a0, a1),
                      *_span(spans["objects"], o0, o1))
            n += 1
        return out[:n]

    def _dict(self, img, parts, objects, dropped=None):
        return image_dict(img, parts, objects, self.filters, self.cluster_slots, self.part_labels, dropped)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        row = self.index[i]
        path = self.shard_paths[row["shard"]]
        try:
            with open(path, "rb") as f:
                (img,) = read_span(f, int(row["image"]), int(row["image"]) + int(row["image_len"]))
                parts = read_span(f, int(row["parts"]), int(row["parts"]) + int(row["parts_len"]))
                objects = read_span(f, int(row["objects"]), int(row["objects"]) + int(row["objects_len"]))
        except ValueError as e:
            raise ValueError(f"{path} no longer matches the stream index of {self.root} ({e}); delete "
                             f"{os.path.join(self.root, INDEX_DIR)} to rebuild it") from None
        return self._dict(img, parts, objects)


def _span(spans, a, b):
    """(start, length) in bytes of elements [a, b) of a scanned list: they are consecutive in the file."""
    if b <= a:
        return 0, 0
    return int(spans[a, 0]), int(spans[b - 1, 1] - spans[a, 0])


def is_store_dataset(name):
    """Whether DatasetCatalog ``name`` was registered by register_pseudo_labels (it can stream)."""
    return bool(getattr(MetadataCatalog.get(name), "pseudo_label_manifest", None))


def build_store_train_set(names, drop_empty=True, collective=False):
    """One map-style dataset streaming the stores behind ``names`` (concatenated in order), or None
    when one of them is not a store (the caller then loads dicts as detectron2 does).
    ``collective``: called by every rank at once (see StoreDataset)."""
    if not names or not all(is_store_dataset(n) for n in names):
        return None
    parts = []
    for n in names:
        meta = MetadataCatalog.get(n)
        parts.append(StoreDataset(meta.pseudo_label_manifest,
                                  PseudoLabelFilters(**meta.get("pseudo_label_filters", {})),
                                  meta.get("pseudo_label_cluster_slots", 0),
                                  meta.get("pseudo_label_part_labels", False), drop_empty=drop_empty,
                                  collective=collective))
    return parts[0] if len(parts) == 1 else torchdata.ConcatDataset(parts)
