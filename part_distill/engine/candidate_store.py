"""On-disk candidates of the ranking stage, partitioned by class bucket so a rank reads only its own classes.

Layout of ``<OUTPUT_DIR>/ranking/candidates``::

    run.json                what the candidates were collected with (and its hash), written first
    chunk_00000.npy         one record per candidate, sorted by (bucket, class, key)
    chunk_00000.json        its index, written after the .npy (the chunk is done once both exist):
                            rows, bucket_offsets [NUM_BUCKETS + 1], class_counts, sha of the rows
    manifest.json           summed class and bucket counts of all chunks (rebuilt by rank 0 each run)

A record is ``key`` (int64 [3]: image index, object row, query id, a canonical order), ``cls``
(int32 object class), ``weight`` (float32 k-means weight) and ``feature`` ([D], FEATURE_DTYPE).
Class c lives in bucket ``c % NUM_BUCKETS``; the rows of bucket b in a chunk are the contiguous slice
``bucket_offsets[b]:bucket_offsets[b + 1]``, read through a memory map, so a rank fitting bucket b
reads only those bytes, once. Chunks are numbered globally (chunk c of the image list), so the files
do not depend on the world size. Each file is written atomically; a chunk whose .npy is truncated or
whose index is damaged is named in a warning and made again.
"""
import hashlib
import json
import logging
import os

import numpy as np

from ..mining.store import ConfigMismatchError
from ..utils.io import atomic_open, atomic_write_json, remove_stale_temps

__all__ = ["CandidateStore", "record_dtype", "write_candidate_chunks", "FEATURE_DTYPES"]

logger = logging.getLogger(__name__)

FEATURE_DTYPES = ("float16", "float32")
_FP16_MAX = float(np.finfo(np.float16).max)


def record_dtype(dim, feature_dtype="float16"):
    """Numpy structured dtype of one candidate record with a [dim] feature."""
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"PART_DISTILL.RANKING.FEATURE_DTYPE must be one of {FEATURE_DTYPES}, got {feature_dtype!r}")
    return np.dtype([("key", "<i8", (3,)), ("cls", "<i4"), ("weight", "<f4"),
                     ("feature", "<f2" if feature_dtype == "float16" else "<f4", (int(dim),))])


class CandidateStore:
    """Reads and writes one candidates directory (see the module docstring)."""

    RUN = "run.json"
    MANIFEST = "manifest.json"

    def __init__(self, root, num_buckets, feature_dtype="float16"):
        if int(num_buckets) < 1:
            raise ValueError(f"PART_DISTILL.RANKING.NUM_BUCKETS must be >= 1, got {num_buckets}")
        record_dtype(1, feature_dtype)  # validates the name
        self.root = os.path.abspath(root)
        self.num_buckets = int(num_buckets)
        self.feature_dtype = feature_dtype

    # ------------------------------------------------------------ paths
    def chunk_path(self, chunk, ext="npy"):
        return os.path.join(self.root, f"chunk_{chunk:05d}.{ext}")

    def bucket_of(self, classes):
        return np.asarray(classes) % self.num_buckets

    # ------------------------------------------------------------ run stamp
    def check_run(self, run_info):
        """Raise ConfigMismatchError if the chunks on disk were collected with another run_info (read-only)."""
        path = os.path.join(self.root, self.RUN)
        try:
            with open(path) as f:
                old = json.load(f)
        except FileNotFoundError:
            return
        except ValueError:
            logger.warning("Ranking candidates: %s is damaged; it is re-made and every chunk re-checked", path)
            return
        if old.get("config_hash") != run_info["config_hash"]:
            a, b = old.get("config", {}), run_info["config"]
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ConfigMismatchError(
                f"{self.root} holds ranking candidates collected with another configuration (differing: "
                f"{diff[:10]}); use a new OUTPUT_DIR or delete that directory")

    def start_run(self, run_info):
        """Main process, before any rank writes: remove temp files a kill left, stamp the run."""
        os.makedirs(self.root, exist_ok=True)
        remove_stale_temps(self.root)
        path = os.path.join(self.root, self.RUN)
        try:
            with open(path) as f:
                ok = json.load(f).get("config_hash") == run_info["config_hash"]
        except (OSError, ValueError):
            ok = False
        if not ok:
            atomic_write_json(path, run_info, indent=1, sort_keys=True)

    # ------------------------------------------------------------ chunks
    def write_chunk(self, chunk, features, classes, weights, keys, run_hash, num_classes):
        """Sort one chunk's candidates by (bucket, class, key) and write it (.npy, then its index)."""
        features = np.asarray(features, dtype=np.float32)
        classes = np.asarray(classes, dtype=np.int64).reshape(-1)
        n = len(classes)
        features = features.reshape(n, -1) if n else features.reshape(0, features.shape[-1] if features.ndim > 1 else 0)
        keys = np.asarray(keys, dtype=np.int64).reshape(n, 3)
        weights = np.asarray(weights, dtype=np.float32).reshape(n)
        where = self.chunk_path(chunk)
        if n and (classes.min() < 0 or classes.max() >= num_classes):
            raise ValueError(f"{where}: object classes must lie in [0, {num_classes}), got "
                             f"{int(classes.min())}..{int(classes.max())}")
        if not np.isfinite(features).all() or not np.isfinite(weights).all():
            bad = ~(np.isfinite(features).all(1) & np.isfinite(weights))
            raise ValueError(f"{where}: {int(bad.sum())} candidates have NaN/inf features or weights "
                             f"(first key (image, object, query) = {keys[bad][0].tolist()})")
        if self.feature_dtype == "float16" and n and np.abs(features).max() > _FP16_MAX:
            raise ValueError(f"{where}: features exceed the float16 range ({float(np.abs(features).max()):.3g}); "
                             "set PART_DISTILL.RANKING.FEATURE_DTYPE float32")
        order = np.lexsort((keys[:, 2], keys[:, 1], keys[:, 0], classes, self.bucket_of(classes)))
        rec = np.empty(n, record_dtype(features.shape[1], self.feature_dtype))
        rec["key"], rec["cls"] = keys[order], classes[order]
        rec["weight"], rec["feature"] = weights[order], features[order]
        buckets = self.bucket_of(rec["cls"])
        offsets = np.searchsorted(buckets, np.arange(self.num_buckets + 1), side="left")
        uniq, cnt = np.unique(rec["cls"], return_counts=True)
        with atomic_open(where, "wb") as f:
            np.save(f, rec)
        index = {"config_hash": run_hash, "rows": n, "dim": int(features.shape[1]),
                 "bucket_offsets": offsets.tolist(),
                 "class_counts": {str(int(c)): int(m) for c, m in zip(uniq, cnt)},
                 "sha": hashlib.sha256(rec.tobytes()).hexdigest()[:16]}
        atomic_write_json(self.chunk_path(chunk, "json"), index, sort_keys=True)
        return index

    def read_index(self, chunk):
        with open(self.chunk_path(chunk, "json")) as f:
            return json.load(f)

    def has_chunk(self, chunk, run_hash):
        """True if chunk is complete and sound; a damaged one is named, removed and reported as missing."""
        jpath, npath = self.chunk_path(chunk, "json"), self.chunk_path(chunk)
        if not os.path.exists(jpath):
            return False
        try:
            index = self.read_index(chunk)
            if index.get("config_hash") != run_hash:
                raise ValueError("its index names another run")
            rows = self._open(chunk)
            if len(rows) != index["rows"] or len(index["bucket_offsets"]) != self.num_buckets + 1:
                raise ValueError(f"{len(rows)} rows on disk, the index says {index['rows']}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("Ranking candidates: chunk %s is damaged (%s); it is made again", npath, e)
            for p in (jpath, npath):
                if os.path.exists(p):
                    os.unlink(p)
            return False
        return True

    def _open(self, chunk):
        path = self.chunk_path(chunk)
        rec = np.load(path, mmap_mode="r", allow_pickle=False)
        if rec.dtype.names != ("key", "cls", "weight", "feature"):
            raise ValueError(f"{path} is not a candidates chunk (fields {rec.dtype.names})")
        return rec

    def read_rows(self, chunk, s, e):
        """Records [s, e) of ``chunk`` (a copy of just that slice, e.g. one bucket); None when empty."""
        if s == e:
            return None
        try:
            return np.array(self._open(chunk)[s:e])
        except (OSError, ValueError) as e:
            raise ValueError(f"ranking candidates chunk {self.chunk_path(chunk)} is unreadable ({e}); delete it "
                             "and rerun the stage to collect it again") from None

    # ------------------------------------------------------------ manifest
    def write_manifest(self, run_info, num_chunks, num_classes):
        """Main process, once every chunk exists: sum the chunk indexes into manifest.json."""
        class_counts = np.zeros(num_classes, np.int64)
        dims, shas = set(), []
        bucket_counts = np.zeros(self.num_buckets, np.int64)
        for c in range(num_chunks):
            index = self.read_index(c)
            for k, v in index["class_counts"].items():
                class_counts[int(k)] += v
            bucket_counts += np.diff(index["bucket_offsets"])
            shas.append(index["sha"])
            if index["rows"]:
                dims.add(index["dim"])
        if len(dims) > 1:
            raise ValueError(f"{self.root}: chunks hold features of different sizes {sorted(dims)}")
        manifest = {"config_hash": run_info["config_hash"], "num_chunks": num_chunks,
                    "num_buckets": self.num_buckets, "feature_dim": dims.pop() if dims else 0,
                    "class_counts": class_counts.tolist(), "bucket_counts": bucket_counts.tolist(),
                    "content_hash": hashlib.sha256(json.dumps(shas).encode()).hexdigest()[:16]}
        atomic_write_json(os.path.join(self.root, self.MANIFEST), manifest, sort_keys=True)
        return manifest

    def bucket_offsets(self, num_chunks, buckets):
        """[num_chunks, len(buckets), 2] row ranges of ``buckets`` in every chunk (one pass over the indexes)."""
        out = np.zeros((num_chunks, len(buckets), 2), np.int64)
        b = np.asarray(buckets, np.int64)
        for c in range(num_chunks):
            off = np.asarray(self.read_index(c)["bucket_offsets"], np.int64)
            out[c, :, 0], out[c, :, 1] = off[b], off[b + 1]
        return out

    def read_manifest(self):
        with open(os.path.join(self.root, self.MANIFEST)) as f:
            return json.load(f)


# Test hook: called with the number of chunks this process has written after each one.
_after_chunk_hook = None


def write_candidate_chunks(store, run_info, num_chunks, produce, num_classes):
    """Collective, resumable write of chunks 0..num_chunks-1; call on all ranks.

    ``produce(c) -> (features [n, D], classes [n], weights [n], keys [n, 3])`` computes chunk c;
    rank r makes the chunks c % world_size == r that are not already sound on disk. Rank 0 then
    writes the manifest. Returns the manifest (every rank).
    """
    from detectron2.utils import comm

    rank, world = comm.get_rank(), comm.get_world_size()
    store.check_run(run_info)
    comm.synchronize()
    if comm.is_main_process():
        store.start_run(run_info)
    comm.synchronize()
    todo = [c for c in range(rank, num_chunks, world) if not store.has_chunk(c, run_info["config_hash"])]
    if todo:
        logger.info("Ranking candidates: rank %d collects %d of its %d chunks", rank, len(todo),
                    len(range(rank, num_chunks, world)))
    for n_done, c in enumerate(todo, 1):
        store.write_chunk(c, *produce(c), run_info["config_hash"], num_classes)
        if _after_chunk_hook is not None:
            _after_chunk_hook(n_done)
    comm.synchronize()
    if comm.is_main_process():
        store.write_manifest(run_info, num_chunks, num_classes)
    comm.synchronize()
    return store.read_manifest()
