"""Measurements of the whole-dataset steps other than training and ranking at a given size.

Each ``audit_*`` function simulates one step at the size it is given and returns a dict of
figures: wall seconds of the parts that grow and the memory the step keeps, measured with
tracemalloc (Python objects and numpy buffers; peak over the step, MB). They back docs/scale.md
and are run by tools/benchmark_train_loader.py --audit. Sizes are arguments, so a test or a
benchmark can run them small.
"""
import os
import pickle
import time
import tracemalloc

import numpy as np

__all__ = ["audit_manifest", "audit_manifest_summaries", "audit_evaluation", "audit_point_sample", "audit_collages", "audit_ratings"]


def _traced(fn, trace=True):
    """(result, wall s, peak traced MB or None) of ``fn()``: timed untraced (tracemalloc slows Python
    several-fold), then run again under tracemalloc for the peak when ``trace`` (``fn`` must be repeatable)."""
    t = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t
    peak = None
    if trace:
        tracemalloc.start()
        try:
            out = fn()
            peak = round(tracemalloc.get_traced_memory()[1] / 2 ** 20, 1)
        finally:
            tracemalloc.stop()
    return out, round(wall, 3), peak


def audit_manifest(root, num_shards, trace=True):
    """A store of ``num_shards`` one-image shards: the resume check of a miner/labeller, the manifest
    write (reads every shard), reading the manifest, and the stream index (scan, then cached).
    ``trace`` False skips the (slow) traced reruns that give the peaks."""
    from ..data.store_dataset import StoreDataset
    from ..data.store_simulation import write_synthetic_store
    from ..mining.store import PartStore, read_manifest

    t = time.perf_counter()
    manifest_path = write_synthetic_store(root, num_shards, shard_size=1)
    gen = time.perf_counter() - t
    store = PartStore(root)
    run = store.read_run()
    todo, resume_s, resume_mb = _traced(lambda: [c for c in range(num_shards) if not store.has_shard(c)])
    assert not todo
    _, manifest_s, manifest_mb = _traced(lambda: store.write_manifest(run, num_shards), trace)
    _, read_s, read_mb = _traced(lambda: read_manifest(manifest_path), trace)
    ds, scan_s, scan_mb = _traced(lambda: StoreDataset(manifest_path, cache=False), trace)
    StoreDataset(manifest_path)  # writes the cache
    _, cached_s, _ = _traced(lambda: StoreDataset(manifest_path), trace=False)
    return {"shards": num_shards, "generate_s": round(gen, 1), "resume_check_s": resume_s,
            "write_manifest_s": manifest_s, "write_manifest_peak_mb": manifest_mb,
            "read_manifest_s": read_s, "manifest_mb": round(os.path.getsize(manifest_path) / 2 ** 20, 2),
            "read_manifest_peak_mb": read_mb, "stream_index_scan_s": scan_s, "stream_index_scan_peak_mb": scan_mb,
            "stream_index_cached_s": cached_s, "images": len(ds)}


def audit_manifest_summaries(root):
    """write_manifest of an existing store from its shard summaries against re-reading every shard
    (the code before summaries); shards without a summary get one first."""
    from ..mining.store import PartStore, shard_summary
    from ..utils.io import atomic_write_json

    store = PartStore(root)
    run, n = store.read_run(), len(store.existing_shards())
    for c in range(n):
        if not os.path.isfile(store.summary_path(c)):
            atomic_write_json(store.summary_path(c), shard_summary(store.read_shard(c)))
    reading = PartStore(root)
    reading.read_summary = lambda c: shard_summary(reading.read_shard(c))
    old, old_s, _ = _traced(lambda: reading.write_manifest(run, n), trace=False)
    new, new_s, _ = _traced(lambda: store.write_manifest(run, n), trace=False)
    assert old["counts"] == new["counts"] and old["shards"] == new["shards"]
    size = sum(os.path.getsize(store.shard_path(c)) for c in range(n))
    return {"shards": n, "images": new["counts"]["images"], "store_mb": round(size / 2 ** 20, 1),
            "write_manifest_reading_shards_s": old_s, "write_manifest_from_summaries_s": new_s}


def audit_evaluation(num_images, size=64, num_proposals=50, seed=0):
    """Bytes each part evaluator keeps per image (its records, what is gathered to rank 0) and its peak."""
    from ..evaluation.average_recall import PartAREvaluator
    from ..evaluation.miou import PartMIoUEvaluator
    from ..evaluation.nmi_ari import PartNMIARIEvaluator
    from ..evaluation.synthetic import synthetic_parts_dataset, synthetic_predictions

    dicts, meta = synthetic_parts_dataset(num_images, size, size, num_object_classes=7, parts_per_class=6,
                                          max_objects=4, unlabeled_prob=0.0, empty_image_prob=0.0, seed=seed)
    common = dict(dataset_dicts=dicts, metadata=meta, distributed=False)
    out = {"images": num_images, "size": size, "proposals": num_proposals}
    for name, ev in (("ar", PartAREvaluator(**common)), ("miou", PartMIoUEvaluator(**common)),
                     ("nmi_ari", PartNMIARIEvaluator(**common))):

        def run():
            ev.reset()
            for i, d in enumerate(dicts):
                ev.process([{"image_id": d["image_id"]}], [synthetic_predictions(d, num_proposals, 8, seed=i)])
            return ev.evaluate()

        _, wall, peak = _traced(run)
        out[name] = {"record_bytes_per_image": round(len(pickle.dumps(ev._records)) / num_images, 1),
                     "wall_s": wall, "peak_mb": peak}
    return out


def audit_point_sample(num_objects, points_per_object, dim, num_classes, cap, seed=0):
    """Dataset-level k-means collection: the bounded sample's peak against holding every point."""
    import torch

    from ..mining.point_sample import ClassPointSample

    g = torch.Generator().manual_seed(seed)

    def objects():
        for i in range(num_objects):
            yield (i, 0, i % num_classes, torch.randn(points_per_object, dim, generator=g),
                   torch.rand(points_per_object, generator=g))

    def sample():
        s, held = ClassPointSample(cap, seed), 0
        for r in objects():
            s.add(*r)
            held = max(held, sum(s._held.values()))
        return sum(len(s.points(c)[0]) for c in s.classes()), held

    (kept, held), wall, _ = _traced(sample, trace=False)
    # Torch buffers are not seen by tracemalloc: count what the sample holds (points + weight + key + order).
    per_point = dim * 4 + 4 + 8 + 3 * 8
    return {"objects": num_objects, "points_per_object": points_per_object, "dim": dim, "classes": num_classes,
            "cap": cap, "points_kept": kept, "wall_s": wall, "peak_held_mb": round(held * per_point / 2 ** 20, 1),
            "all_points_mb": round(num_objects * points_per_object * (dim + 1) * 4 / 2 ** 20, 1)}


def _collage_records(root, num_classes, clusters, per_cluster, image_size=32, num_files=8, seed=0):
    from PIL import Image

    from ..utils.masks import encode_rle

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    files = []
    for i in range(num_files):
        path = os.path.join(root, f"img_{i}.png")
        Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)).save(path)
        files.append(path)
    m = np.zeros((image_size, image_size), bool)
    m[4:20, 6:24] = True
    obj = np.zeros_like(m)
    obj[2:28, 2:30] = True
    seg, oseg = encode_rle(m), encode_rle(obj)
    records = []
    # One image record per (class, instance): its parts are one of each cluster.
    for c in range(num_classes):
        for n in range(per_cluster):
            parts = [{"segmentation": seg, "score": 0.9, "cluster_id": k, "object_class": c,
                      "object_segmentation": oseg, "object_bbox": [2, 2, 28, 26]} for k in range(clusters)]
            records.append({"file_name": files[(c + n) % num_files], "height": image_size, "width": image_size,
                            "parts": parts})
    return records


def audit_collages(root, num_classes, clusters=8, per_cluster=9, tile_size=32, trace=False):
    """make_collages over ``num_classes`` x ``clusters`` groups of ``per_cluster`` instances each
    (``trace``: also the traced peak, from a second run)."""
    from ..visualization.collages import make_collages

    records = _collage_records(os.path.join(root, "images"), num_classes, clusters, per_cluster)
    index, wall, peak = _traced(lambda: make_collages(records, [f"c{c}" for c in range(num_classes)],
                                                      os.path.join(root, "collages"), tile_size=tile_size), trace)
    return {"classes": num_classes, "clusters": clusters, "collages": len(index["collages"]),
            "instances": num_classes * clusters * per_cluster, "tile_size": tile_size, "wall_s": wall,
            "ms_per_collage": round(1000 * wall / max(1, len(index["collages"])), 2), "peak_mb": peak,
            "index_json_mb": round(os.path.getsize(os.path.join(root, "collages", "index.json")) / 2 ** 20, 2)}


def audit_ratings(db_path, num_collages, rated=None):
    """A rater with ``rated`` (default all but one) of ``num_collages`` collages rated: the cost of one
    rating page (their rated set + the next unrated item of the queue) and of one rating."""
    from ..rating.db import RatingDB, next_unrated

    rated = num_collages - 1 if rated is None else rated
    db = RatingDB(db_path)
    queue = [("m", f"c{i:06d}") for i in range(num_collages)]
    import sqlite3

    # Bulk insert of the existing ratings (the one-by-one API commits each, as a web rater does).
    con = sqlite3.connect(db_path)
    con.executemany("INSERT OR REPLACE INTO ratings (rater, method, collage, rating, updated) VALUES (?, ?, ?, ?, ?)",
                    [("r", m, c, 3, 0.0) for m, c in queue[:rated]])
    con.commit()
    con.close()
    t = time.perf_counter()
    item = next_unrated(queue, db.rated("r"))
    page_s = time.perf_counter() - t
    t = time.perf_counter()
    db.rate("r", *item, 4)
    rate_s = time.perf_counter() - t
    return {"collages": num_collages, "rated": rated, "page_s": round(page_s, 4), "rate_s": round(rate_s, 4)}
