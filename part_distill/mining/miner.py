"""The part miner: object masks -> dense features -> batched k-means -> part masks -> store shards.

Per batch of ``MINING.BATCH_SIZE`` images:
  1. read each image, get its objects from the object source (masks at original resolution);
  2. resize the image so its long side is ``MINING.IMAGE_SIZE``, extract features on a grid of
     stride s (one forward pass for the batch);
  3. for each object, the fraction of every grid cell it covers (its mask averaged over the cell);
     cells with coverage > 0 are the object's k-means points, weighted by that coverage, so small
     objects keep their boundary cells and a cell half inside counts half;
  4. one weighted ``batched_kmeans`` call for all objects of the batch; objects with fewer than k
     covered cells are skipped and counted (``too_few_pixels``), as are objects whose features are
     not finite (``nan_features``);
  5. full-resolution assignment: every object pixel gets the part whose center is nearest to the
     bilinearly upsampled feature at that pixel. The upsampling is applied to the k per-center
     score maps (cosine: <c, x/|x|>; l2: 2<c, x> - |c|^2) instead of to the D-dim features: both
     scores are linear in the (normalised) feature, so interpolating them gives exactly the scores
     of the interpolated features (k channels instead of D), and the argmax is the nearest center
     of ``kmeans.assign`` on the upsampled features. Hence the parts of an object partition it;
  6. optional dense-CRF refinement, then RLE encoding.

Dataset-level clustering (``MINING.LEVEL "dataset"``, the one-stage baseline of Table 6): one
k-means per object class over the feature points of all its objects in the mined datasets, then
every object's pixels are assigned to the nearest of its class's k centers (step 5 above), so a
cluster id means the same part across the instances of a class. :func:`mine_parts` runs two passes:
  a. collect: each rank extracts the weighted points (steps 1-3) of the images of its own shards
     (all of them, done or not: the centers depend on the whole dataset) into a bounded seeded
     sample of at most ``MINING.DATASET_MAX_POINTS`` points per class (point_sample.py: memory
     does not grow with the dataset); the ranks all-gather and merge their samples, which gives
     the 1-process sample;
  b. fit: per class, its sample in (image index, object) order goes into
     ``BatchedKMeans.fit_dataset``; every rank fits the same centers;
  c. assign: the ordinary sharded, resumable mining loop, with the class centers instead of a
     per-object k-means. Objects of a class with fewer than k points in total are ``too_few_pixels``.
Pass (a) reads every image twice per run; that is the price of a dataset-wide fit without a cache.

Determinism: the k-means seed of a batch is derived from ``MINING.SEED`` and the position of its
first image in the mined list; batches never cross shard boundaries. So the output depends only on
the config (SEED, SHARD_SIZE, BATCH_SIZE are hashed), not on the rank, world size or on resumes.
"""
import logging
import math
import os
import time
from collections import defaultdict

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import DatasetCatalog
from detectron2.utils import comm

from ..data.fingerprint import dataset_summary
from ..data.image_io import UnreadableImageError, read_image
from ..utils.masks import encode_rle, mask_to_bbox_xywh
from .features import MINING_FEATURE_REGISTRY, build_feature_extractor
from .kmeans import METRICS, BatchedKMeans, pad_packed
from .object_sources import build_object_source
from .point_sample import ClassPointSample
from .store import (OBJECT_STRIDE, PART_CATEGORY, PART_STRIDE, PartStore, config_hash, empty_counts,
                    finish_store)


__all__ = ["PartMiner", "mine_parts", "mining_main", "mining_run_info", "load_mining_inputs", "resolve_output_dir",
           "check_mining_config"]

logger = logging.getLogger(__name__)

# Test hook: called with the number of shards this process has written after each one.
_after_shard_hook = None

LEVELS = ("instance", "dataset")


def _batch_seed(seed, first_index):
    return int(np.random.SeedSequence([int(seed), int(first_index)]).generate_state(1)[0])


def _class_seed(seed, category_id, purpose):
    """Seed of a dataset-level fit (purpose 0: subsample, 1: k-means++), apart from the batch seeds."""
    return int(np.random.SeedSequence([int(seed), 1 << 30, int(category_id), int(purpose)]).generate_state(1)[0])


def check_mining_config(cfg):
    """Reject obviously invalid MINING values (and a zero MODEL.PIXEL_STD when the features come from
    the model) with the key's name, before anything is loaded or a store is stamped."""
    m = cfg.MINING
    at_least = {"NUM_CLUSTERS": 1, "MAX_ITER": 1, "IMAGE_SIZE": 1, "BATCH_SIZE": 1, "SHARD_SIZE": 1,
                "RGBXY_STRIDE": 1, "POINT_CHUNK": 1, "MIN_PIXELS": 0, "DATASET_MAX_POINTS": 0, "CHUNK_BYTES": 0}
    for key, low in at_least.items():
        value = m[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"MINING.{key} must be an integer >= {low}, got {value!r}")
    if not m.TOL >= 0:
        raise ValueError(f"MINING.TOL must be >= 0, got {m.TOL!r}")
    choices = {"LEVEL": LEVELS, "METRIC": METRICS, "NAN_POLICY": ("raise", "skip"),
               "FEATURES": tuple(sorted(k for k, _ in MINING_FEATURE_REGISTRY))}
    for key, allowed in choices.items():
        if m[key] not in allowed:
            raise ValueError(f"MINING.{key} must be one of {tuple(allowed)}, got {m[key]!r}")
    if m.FEATURES != "rgbxy" and not all(s > 0 for s in cfg.MODEL.PIXEL_STD):
        raise ValueError(f"MODEL.PIXEL_STD must be > 0 (it divides the image), got {list(cfg.MODEL.PIXEL_STD)}")


def _resized_hw(h, w, long_side):
    scale = long_side / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


class PartMiner:
    """Mines the parts of the objects of a batch of images (no I/O besides reading images)."""

    @configurable
    def __init__(self, *, object_source, feature_extractor, kmeans, image_size=640, crf=None,
                 device="cpu", level="instance", dataset_max_points=0):
        if level not in LEVELS:
            raise ValueError(f"MINING.LEVEL must be one of {LEVELS}, got {level!r}")
        self.level = level
        self.dataset_max_points = dataset_max_points
        # LEVEL "dataset": class id -> centers [k, D] (None: too few points), set by fit_classes.
        self.class_centers = None
        self.object_source = object_source
        self.features = feature_extractor
        self.kmeans = kmeans
        self.image_size = image_size
        self.crf = crf
        self.device = torch.device(device)
        self.timers = defaultdict(float)

    @classmethod
    def from_config(cls, cfg):
        check_mining_config(cfg)  # before the feature extractor loads its weights
        return {"object_source": build_object_source(cfg), "feature_extractor": build_feature_extractor(cfg),
                "kmeans": BatchedKMeans(cfg), "image_size": cfg.MINING.IMAGE_SIZE,
                "crf": _build_crf(cfg), "device": cfg.MODEL.DEVICE, "level": cfg.MINING.LEVEL,
                "dataset_max_points": cfg.MINING.DATASET_MAX_POINTS}

    # ------------------------------------------------------------ steps
    def _tick(self, name, start):
        now = time.perf_counter()
        self.timers[name] += now - start
        return now

    def _read(self, dd):
        try:
            image = read_image(dd["file_name"], format="RGB")
        except UnreadableImageError as e:
            return None, f"unreadable_image: {type(e).__name__}: {e}"
        if image.shape[:2] != (dd["height"], dd["width"]):
            return None, (f"size_mismatch: file is {image.shape[:2]}, dataset says "
                          f"{(dd['height'], dd['width'])}")
        return np.ascontiguousarray(image), None

    def _extract(self, images):
        """Resized, padded batch -> list of per-image feature grids [D, gh, gw] (valid part)."""
        sizes = [_resized_hw(im.shape[0], im.shape[1], self.image_size) for im in images]
        div, s = self.features.size_divisibility, self.features.stride
        ph = int(math.ceil(max(h for h, _ in sizes) / div) * div)
        pw = int(math.ceil(max(w for _, w in sizes) / div) * div)
        batch = torch.zeros(len(images), 3, ph, pw, dtype=torch.float32)
        for i, (im, (h, w)) in enumerate(zip(images, sizes)):
            interp = cv2.INTER_AREA if h < im.shape[0] else cv2.INTER_LINEAR
            r = cv2.resize(im, (w, h), interpolation=interp) if (h, w) != im.shape[:2] else im
            batch[i, :, :h, :w] = torch.from_numpy(np.require(r, requirements="W")).permute(2, 0, 1)
        feats = self.features(batch.to(self.device))
        return [feats[i, :, : math.ceil(h / s), : math.ceil(w / s)] for i, (h, w) in enumerate(sizes)], sizes

    def _coverage(self, masks, size, grid_hw):
        """[n, H, W] bool -> [n, gh, gw] fraction of each grid cell covered at the resized size."""
        s = self.features.stride
        m = torch.from_numpy(np.stack(masks)).to(self.device, torch.float32)[:, None]
        m = F.interpolate(m, size=size, mode="area")
        gh, gw = grid_hw
        m = F.pad(m, (0, gw * s - size[1], 0, gh * s - size[0]))
        return F.avg_pool2d(m, s)[:, 0]

    def _assign_full(self, grid, centers, mask, size):
        """Labels [P] of the pixels of ``mask`` (H, W) from the bilinearly upsampled center scores."""
        d, gh, gw = grid.shape
        if self.kmeans.metric == "cosine":
            x = F.normalize(grid, dim=0, eps=1e-12)
            scores = torch.einsum("kd,dhw->khw", centers, x)
        else:
            scores = 2 * torch.einsum("kd,dhw->khw", centers, grid) - (centers * centers).sum(1)[:, None, None]
        ys, xs = np.nonzero(mask)
        H, W = mask.shape
        s = self.features.stride
        # Pixel centre -> resized image -> grid coordinate, in grid_sample's align_corners=False units.
        gy = ((ys + 0.5) * (size[0] / H) / s) / gh * 2 - 1
        gx = ((xs + 0.5) * (size[1] / W) / s) / gw * 2 - 1
        pts = torch.from_numpy(np.stack([gx, gy], 1).astype(np.float32)).to(grid.device)[None, None]
        sampled = F.grid_sample(scores[None], pts, mode="bilinear", padding_mode="border", align_corners=False)
        return sampled[0, :, 0].argmax(0).cpu().numpy(), ys, xs

    # ------------------------------------------------------------ batch
    def _read_and_extract(self, items):
        """Records of ``items`` with their objects, and feature grids / resized sizes of the readable ones."""
        t = time.perf_counter()
        records, ok = [], []
        for index, dd in items:
            image, reason = self._read(dd)
            rec = {"index": index, "dataset_dict": dd, "skip_reason": reason, "objects": [], "image": image}
            records.append(rec)
            if image is None:
                logger.warning("Skipping image %s: %s", dd["file_name"], reason)
                continue
            rec["objects"] = [[o, None, None] for o in self.object_source(dd, image)]
            ok.append(rec)
        t = self._tick("read+objects", t)
        if not ok:
            return records, ok, [], []
        grids, sizes = self._extract([r["image"] for r in ok])
        self._tick("features", t)
        return records, ok, grids, sizes

    def _object_points(self, ok, grids, sizes):
        """Weighted k-means points of every object with finite features (others get "nan_features")."""
        points, weights, owners = [], [], []
        for rec, grid, size in zip(ok, grids, sizes):
            if not rec["objects"]:
                continue
            cov = self._coverage([o[0].mask for o in rec["objects"]], size, grid.shape[1:])
            flat = grid.reshape(grid.shape[0], -1).t()
            for j, c in enumerate(cov.reshape(cov.shape[0], -1)):
                sel = torch.nonzero(c > 0)[:, 0]
                f = flat[sel]
                if not torch.isfinite(f).all():
                    if self.kmeans.nan_policy == "raise":
                        raise ValueError(
                            f"non-finite features for object {j} of {rec['dataset_dict']['file_name']} "
                            "(MINING.NAN_POLICY 'raise'): check the feature setup (MODEL.PIXEL_STD, "
                            "MODEL.WEIGHTS, MINING.FEATURES), or set MINING.NAN_POLICY 'skip' to skip and "
                            "count such objects")
                    rec["objects"][j][2] = "nan_features"
                    continue
                points.append(f)
                weights.append(c[sel])
                owners.append((rec, grid, size, j))
        return points, weights, owners

    def collect_batch(self, items):
        """Dataset-level pass (a): ``[(index, object position, category_id, points [n, D], weights [n])]``."""
        records, ok, grids, sizes = self._read_and_extract(items)
        points, weights, owners = self._object_points(ok, grids, sizes)
        return [(rec["index"], j, rec["objects"][j][0].category_id, p.cpu(), w.cpu())
                for (rec, _, _, j), p, w in zip(owners, points, weights)]

    def fit_classes(self, collected, seed):
        """Dataset-level pass (b): per-class centers from :meth:`collect_batch` outputs (any order) or
        from a :class:`ClassPointSample` of them.

        Each class fits on its bounded seeded sample (at most MINING.DATASET_MAX_POINTS points), in
        (image index, object) order, so the result does not depend on how the collection was split
        over batches or ranks. Sets and returns ``self.class_centers``.
        """
        sample = collected if isinstance(collected, ClassPointSample) else \
            ClassPointSample(self.dataset_max_points, seed).add_records(collected)
        centers = {}
        for cat in sample.classes():
            x, w = sample.points(cat)
            res = self.kmeans.fit_dataset(x.to(self.device), weights=w.to(self.device),
                                          generator=torch.Generator().manual_seed(_class_seed(seed, cat, 1)))
            centers[cat] = None if bool(res.skipped) else res.centers
        self.class_centers = centers
        return centers

    def mine_batch(self, items, seed):
        """Mine ``items`` = [(index, dataset_dict), ...] with k-means seed ``seed``.

        Returns one record per item: ``{"index", "dataset_dict", "skip_reason", "objects"}`` where
        objects are ``(MinedObject, part_masks or None, skip_reason)`` and part_masks is a list of
        ``(cluster_id, HxW bool)``. With ``level == "dataset"`` the objects are assigned to the
        centers of :meth:`fit_classes` (``seed`` is unused).
        """
        records, ok, grids, sizes = self._read_and_extract(items)
        if not ok:
            return records
        t = time.perf_counter()
        points, weights, owners = self._object_points(ok, grids, sizes)
        t = self._tick("points", t)
        if points and self.level == "dataset":
            if self.class_centers is None:
                raise RuntimeError("MINING.LEVEL 'dataset': call fit_classes() (mine_parts does) before mine_batch()")
            for rec, grid, size, j in owners:
                obj = rec["objects"][j]
                centers = self.class_centers.get(obj[0].category_id)
                if centers is None:
                    obj[2] = "too_few_pixels"
                    continue
                obj[1] = self._assign_full(grid, centers, obj[0].mask, size)
            t = self._tick("assign", t)
        elif points:
            feats, valid, w = pad_packed(points, weights)
            res = self.kmeans.fit(feats, valid, weights=w, generator=torch.Generator().manual_seed(seed))
            t = self._tick("kmeans", t)
            for i, (rec, grid, size, j) in enumerate(owners):
                obj = rec["objects"][j]
                if bool(res.skipped[i]):
                    obj[2] = "too_few_pixels"
                    continue
                labels, ys, xs = self._assign_full(grid, res.centers[i], obj[0].mask, size)
                obj[1] = (labels, ys, xs)
            t = self._tick("assign", t)
        if self.crf is not None:
            self._refine(ok)
            t = self._tick("crf", t)
        for rec in ok:
            for obj in rec["objects"]:
                if obj[1] is not None:
                    obj[1] = _label_masks(*obj[1], obj[0].mask.shape)
            rec.pop("image")
        self._tick("part_masks", t)
        return records

    def _refine(self, records):
        jobs, targets = [], []
        k = self.kmeans.num_clusters
        for rec in records:
            for obj in rec["objects"]:
                if obj[1] is not None:
                    labels, ys, xs = obj[1]
                    lab = np.full(obj[0].mask.shape, -1, dtype=np.int64)
                    lab[ys, xs] = labels
                    jobs.append((rec["image"], lab, obj[0].mask, k))
                    targets.append(obj)
        for obj, refined in zip(targets, self.crf.refine_many(jobs)):
            _, ys, xs = obj[1]
            obj[1] = (refined[ys, xs], ys, xs)


def _label_masks(labels, ys, xs, shape):
    out = []
    for c in np.unique(labels):
        m = np.zeros(shape, dtype=bool)
        sel = labels == c
        m[ys[sel], xs[sel]] = True
        out.append((int(c), m))
    return out


def _build_crf(cfg):
    """The dense-CRF refiner (its worker pool starts lazily), or None when the CRF is off."""
    if not cfg.MINING.CRF.ENABLED:
        return None
    from .dense_crf import DenseCRFRefiner

    return DenseCRFRefiner(cfg)


# ---------------------------------------------------------------- records -> COCO shard
def records_to_shard(records, chunk, run_hash):
    """COCO-format shard (see store.py) of the mined ``records`` of one chunk."""
    images, objects, parts, skipped = [], [], [], []
    counts = empty_counts()
    for rec in records:
        dd, index = rec["dataset_dict"], rec["index"]
        if rec["skip_reason"] is not None:
            reason = rec["skip_reason"].split(":", 1)[0]
            counts["images_skipped"][reason] = counts["images_skipped"].get(reason, 0) + 1
            skipped.append({"index": index, "file_name": dd["file_name"], "dataset": dd["_mining_dataset"],
                            "reason": rec["skip_reason"]})
            continue
        image_id = index + 1
        counts["images"] += 1
        images.append({"id": image_id, "file_name": dd["file_name"], "height": dd["height"],
                       "width": dd["width"], "dataset": dd["_mining_dataset"],
                       "source_image_id": dd.get("image_id")})
        if len(rec["objects"]) >= OBJECT_STRIDE:
            raise ValueError(f"{dd['file_name']} has {len(rec['objects'])} objects; at most {OBJECT_STRIDE - 1} fit the id scheme")
        for j, (obj, part_masks, reason) in enumerate(rec["objects"]):
            oid = image_id * OBJECT_STRIDE + j
            counts["instances"] += 1
            if reason is not None:
                counts["instances_skipped"][reason] = counts["instances_skipped"].get(reason, 0) + 1
            part_masks = part_masks or []
            objects.append({"id": oid, "image_id": image_id, "category_id": obj.category_id,
                            "source_id": obj.source_id, "score": obj.score,
                            "segmentation": encode_rle(obj.mask), "bbox": mask_to_bbox_xywh(obj.mask),
                            "area": int(obj.mask.sum()), "num_parts": len(part_masks), "skip_reason": reason})
            for cluster, m in part_masks:
                counts["parts"] += 1
                parts.append({"id": oid * PART_STRIDE + cluster, "image_id": image_id,
                              "category_id": PART_CATEGORY["id"], "segmentation": encode_rle(m),
                              "bbox": mask_to_bbox_xywh(m), "area": int(m.sum()), "iscrowd": 0,
                              "object_id": oid, "object_category_id": obj.category_id, "cluster": cluster})
    return {"info": {"description": "part_distill mined parts", "config_hash": run_hash, "chunk": chunk},
            "licenses": [], "categories": [dict(PART_CATEGORY)], "images": images, "annotations": parts,
            "objects": objects, "skipped_images": skipped, "counts": counts}


# ---------------------------------------------------------------- the whole run
def load_mining_inputs(cfg):
    """The mined image list (datasets of ``MINING.DATASETS`` concatenated) and its summary."""
    dicts, inputs = [], []
    if not cfg.MINING.DATASETS:
        raise ValueError("MINING.DATASETS is empty: name the DatasetCatalog datasets to mine")
    for name in cfg.MINING.DATASETS:
        ds = DatasetCatalog.get(name)
        inputs.append(dataset_summary(name, ds))  # the fingerprint makes the store refuse other data
        dicts += [dict(d, _mining_dataset=name) for d in ds]
    return dicts, inputs


# Keys that change how fast, not what, is mined.
_EXECUTION_ONLY = {"OUTPUT_DIR", "CHUNK_BYTES", "POINT_CHUNK"}
_CRF_EXECUTION_ONLY = {"NUM_WORKERS", "START_METHOD"}


def mining_run_info(cfg, inputs):
    """Config subset + inputs that determine the mined bytes, and their hash."""
    m = {k: v for k, v in cfg.MINING.items() if k not in _EXECUTION_ONLY and k != "CRF"}
    m["CRF"] = {k: v for k, v in cfg.MINING.CRF.items() if k not in _CRF_EXECUTION_ONLY}
    config = {"MINING": _plain(m), "MODEL.DEVICE": cfg.MODEL.DEVICE}
    if cfg.MINING.FEATURES != "rgbxy" or cfg.MINING.OBJECT_SOURCE == "model":
        config["MODEL"] = _plain(cfg.MODEL)
        config["INPUT.FORMAT"] = cfg.INPUT.FORMAT
    body = {"config": config, "inputs": {"datasets": inputs}}
    return dict(body, config_hash=config_hash(body))


def _plain(node):
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, tuple):
        return [_plain(v) for v in node]
    return node


def resolve_output_dir(cfg):
    return cfg.MINING.OUTPUT_DIR or os.path.join(cfg.OUTPUT_DIR, "mined_parts")


def mine_parts(cfg, overwrite=False, miner=None):
    """Mine ``MINING.DATASETS`` into the store at ``resolve_output_dir(cfg)``; call on every rank.

    Rank r mines shards c with c % world_size == r that are not on disk yet; after a barrier rank 0
    sums the shards into manifest.json, which it returns (other ranks return None).
    """
    check_mining_config(cfg)
    dicts, inputs = load_mining_inputs(cfg)
    run_info = mining_run_info(cfg, inputs)
    store = PartStore(resolve_output_dir(cfg))
    rank, world = comm.get_rank(), comm.get_world_size()
    store.check_run(run_info, overwrite)
    comm.synchronize()  # every rank has checked before rank 0 may clear the directory
    if comm.is_main_process():
        store.start_run(run_info, overwrite)
    comm.synchronize()

    size, bsize = cfg.MINING.SHARD_SIZE, cfg.MINING.BATCH_SIZE
    num_chunks = int(math.ceil(len(dicts) / size))
    todo = [c for c in range(rank, num_chunks, world) if not store.has_shard(c)]
    if cfg.MINING.LEVEL == "dataset":
        # Every rank decides alike (same files, checked after the barrier) whether to collect.
        if not all(store.has_shard(c) for c in range(num_chunks)):
            miner = miner or PartMiner(cfg)
            _fit_dataset_level(miner, dicts, range(rank, num_chunks, world), size, bsize, cfg.MINING.SEED)
        comm.synchronize()
    if todo:
        miner = miner or PartMiner(cfg)
        logger.info("Rank %d/%d mining %d of %d shards into %s", rank, world, len(todo), num_chunks, store.root)
        from tqdm import tqdm

        bar = tqdm(total=sum(len(dicts[c * size:(c + 1) * size]) for c in todo), disable=rank != 0,
                   desc="mining parts", unit="img")
        for n_done, c in enumerate(todo, 1):
            items = list(enumerate(dicts[c * size:(c + 1) * size], c * size))
            records = []
            for b in range(0, len(items), bsize):
                batch = items[b:b + bsize]
                records += miner.mine_batch(batch, _batch_seed(cfg.MINING.SEED, batch[0][0]))
                bar.update(len(batch))
            t = time.perf_counter()
            store.write_shard(c, records_to_shard(records, c, run_info["config_hash"]))
            miner.timers["encode+write"] += time.perf_counter() - t
            if _after_shard_hook is not None:
                _after_shard_hook(n_done)
        bar.close()
        if miner.crf is not None:
            miner.crf.close()
    return finish_store(store, run_info, num_chunks, "Mined parts",
                        empty_hint="every object was skipped (see instances_skipped / images_skipped): check "
                                   "MINING.DATASETS, the object source and the features")


def _fit_dataset_level(miner, dicts, chunks, size, bsize, seed):
    """Passes (a) and (b) of dataset-level mining: sample this rank's points, merge the ranks' samples, fit."""
    sample = ClassPointSample(miner.dataset_max_points, seed)
    for c in chunks:
        items = list(enumerate(dicts[c * size:(c + 1) * size], c * size))
        for b in range(0, len(items), bsize):
            sample.add_records(miner.collect_batch(items[b:b + bsize]))
    if comm.get_world_size() > 1:
        merged = ClassPointSample(miner.dataset_max_points, seed)
        for state in comm.all_gather(sample.state()):
            merged.merge(state)
        sample = merged
    t = time.perf_counter()
    centers = miner.fit_classes(sample, seed)
    miner.timers["dataset_kmeans"] += time.perf_counter() - t
    logger.info("Dataset-level k-means: %d classes fitted from %d objects", sum(v is not None for v in centers.values()),
                sample.num_objects)
    return centers


def mining_main(args):
    """Entry of tools/mine_parts.py on every rank: config from ``args``, then :func:`mine_parts`."""
    from ..engine.setup import setup

    cfg = setup(args)
    return mine_parts(cfg, overwrite=getattr(args, "overwrite", False))
