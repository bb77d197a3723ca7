"""Synthetic part stores of any size, and the peak memory of a train loader drawing from one.

``write_synthetic_store`` writes N images in the real store format (run.json, COCO shards written by
the miner's ``records_to_shard`` layout, manifest.json by ``PartStore.write_manifest``) without a
model: a few template images (``num_variants``, each with a couple of objects and parts of known
areas, some of which the default DATASETS.PSEUDO_LABELS filters drop, one with no part left) are
encoded once and repeated with the ids an N-image store would have. All images point at the same
few small PNGs, so generation time is dominated by JSON writing (about 10^5 images a minute).

``measure_train_loader`` runs, in a fresh subprocess, what a training process does with a store
(register it, build the train loader of ``engine/trainer.py``, draw batches through the real
part mapper) and returns its peak RSS; ``stream=False`` measures the list path (the store read
by ``load_pseudo_labels`` into one list, as before) for comparison.
"""
import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from ..mining.miner import records_to_shard
from ..mining.object_sources import MinedObject
from ..mining.store import (OBJECT_STRIDE, PART_STRIDE, PartStore, add_counts, config_hash, empty_counts,
                            read_manifest)

__all__ = ["write_synthetic_store", "measure_train_loader"]

# The store's run stamp names its generator, so a store is rewritten when its parameters change.
_GENERATOR = "part_distill.data.store_simulation"


def _template_records(image_size, num_variants, rng):
    """One miner record per variant: two objects, three parts each (one too small to keep in
    variant 0's first object), variant ``num_variants - 1`` with only parts the filters drop."""
    s = image_size
    out = []
    for v in range(num_variants):
        objects = []
        for j in range(2):
            y0, x0 = int(rng.integers(0, s // 4)), int(rng.integers(0, s // 4))
            h, w = int(rng.integers(s // 2, 3 * s // 4)), int(rng.integers(s // 2, 3 * s // 4))
            om = np.zeros((s, s), bool)
            om[y0:y0 + h, x0:x0 + w] = True
            # Horizontal bands of the object: 10 %, 45 %, 45 % of it (the 10 % band passes the 5 %
            # filter; the last variant's single band covers 100 % and fails MAX_PART_AREA_RATIO).
            cuts = [0, max(1, h // 10), max(2, h // 10 + (h - h // 10) // 2), h]
            if v == num_variants - 1:
                cuts = [0, h]
            parts = []
            for c in range(len(cuts) - 1):
                pm = np.zeros((s, s), bool)
                pm[y0 + cuts[c]:y0 + cuts[c + 1], x0:x0 + w] = True
                parts.append((c, pm))
            objects.append((MinedObject(j, int(rng.integers(0, 20)), om, 1.0), parts, None))
        dd = {"file_name": "", "height": s, "width": s, "image_id": v, "_mining_dataset": "synthetic"}
        out.append({"index": v, "dataset_dict": dd, "skip_reason": None, "objects": objects})
    return out


def _renumber(template, index, file_name):
    """The template shard's records of one image as image ``index`` of the store would hold them."""
    image_id = index + 1
    img = dict(template["images"][0], id=image_id, file_name=file_name, source_image_id=index)
    old_image = template["images"][0]["id"]
    objs, parts = [], []
    for o in template["objects"]:
        oid = image_id * OBJECT_STRIDE + (o["id"] - old_image * OBJECT_STRIDE)
        objs.append(dict(o, id=oid, image_id=image_id))
    for p in template["annotations"]:
        oid = image_id * OBJECT_STRIDE + (p["object_id"] - old_image * OBJECT_STRIDE)
        parts.append(dict(p, id=oid * PART_STRIDE + p["cluster"], image_id=image_id, object_id=oid))
    return img, objs, parts


def _write_images(root, image_size, n, rng):
    from PIL import Image

    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    names = []
    for i in range(n):
        path = os.path.join(root, "images", f"synthetic_{i}.png")
        if not os.path.isfile(path):
            Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)).save(path)
        names.append(path)
    return names


def write_synthetic_store(root, num_images, shard_size=256, image_size=32, num_variants=8, num_image_files=4,
                          seed=0):
    """Write (or keep, when already complete with these parameters) an N-image store; returns its manifest path."""
    params = {"generator": _GENERATOR, "num_images": int(num_images), "shard_size": int(shard_size),
              "image_size": int(image_size), "num_variants": int(num_variants),
              "num_image_files": int(num_image_files), "seed": int(seed)}
    run = {"config": {"MINING": {"LEVEL": "instance", "NUM_CLUSTERS": 3, "SHARD_SIZE": shard_size}},
           "inputs": {"simulation": params}}
    run["config_hash"] = config_hash(run)
    store = PartStore(root)
    manifest_path = os.path.join(store.root, PartStore.MANIFEST)
    if os.path.isfile(manifest_path) and read_manifest(manifest_path).get("config_hash") == run["config_hash"]:
        return manifest_path
    rng = np.random.default_rng(seed)
    files = _write_images(store.root, image_size, num_image_files, rng)
    store.start_run(run, overwrite=True)
    templates = [records_to_shard([rec], 0, run["config_hash"])
                 for rec in _template_records(image_size, num_variants, rng)]
    num_chunks = (num_images + shard_size - 1) // shard_size
    for c in range(num_chunks):
        images, objects, parts, counts = [], [], [], None
        for index in range(c * shard_size, min(num_images, (c + 1) * shard_size)):
            t = templates[index % num_variants]
            img, objs, ps = _renumber(t, index, files[index % num_image_files])
            images.append(img)
            objects += objs
            parts += ps
            counts = _add(counts, t["counts"])
        shard = dict(copy.deepcopy(templates[0]), images=images, objects=objects, annotations=parts, counts=counts)
        shard["info"]["chunk"] = c
        store.write_shard(c, shard)
    store.write_manifest(run, num_chunks)
    return manifest_path


def _add(total, counts):
    return add_counts(total if total is not None else empty_counts(), counts)


# ---------------------------------------------------------------- measurement
def _rss_mb():
    """Peak RSS of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _measure(manifest_path, num_batches, batch_size, image_size, num_workers, stream):
    """In this process: build the train loader of the store and draw ``num_batches`` batches.

    With ``num_workers`` > 0 the workers' memory is not in these figures (the default 0 keeps the
    dataset in this process, which is what is measured)."""
    from detectron2.data import DatasetCatalog, build_detection_train_loader

    from ..data.mappers import build_dataset_mapper
    from ..data.pseudo_labels import PseudoLabelFilters, register_pseudo_labels
    from ..data.samplers import ResumableTrainingSampler
    from ..data.train_loader import build_train_loader
    from ..engine.setup import build_cfg

    name = "simulated_store"
    register_pseudo_labels(name, manifest_path, PseudoLabelFilters())
    cfg = build_cfg(opts=["DATASETS.TRAIN", f"('{name}',)", "INPUT.DATASET_MAPPER_NAME", "PartTargetLSJMapper",
                          "INPUT.IMAGE_SIZE", str(image_size), "SOLVER.IMS_PER_BATCH", str(batch_size),
                          "DATALOADER.NUM_WORKERS", str(num_workers), "SEED", "0"])
    base = _rss_mb()
    t0 = time.perf_counter()
    if stream:
        loader = build_train_loader(cfg)
    else:
        # The list path as it was: every dict in one list, then detectron2's DatasetFromList.
        from detectron2.data import get_detection_dataset_dicts

        dicts = get_detection_dataset_dicts([name], filter_empty=True)
        loader = build_detection_train_loader(cfg, mapper=build_dataset_mapper(cfg, True), dataset=dicts,
                                              sampler=ResumableTrainingSampler(len(dicts), seed=0))
        del dicts
    built = time.perf_counter()
    after_build = _current_rss_mb()
    seen = 0
    for b, batch in enumerate(loader):
        seen += len(batch)
        if b + 1 >= num_batches:
            break
    done = time.perf_counter()
    DatasetCatalog.pop(name, None)
    return {"stream": stream, "num_images": read_manifest(manifest_path)["counts"]["images"],
            "batches": num_batches, "images_drawn": seen, "num_workers": num_workers,
            "peak_rss_mb": round(_rss_mb(), 1), "rss_before_build_mb": round(base, 1),
            "rss_after_build_mb": round(after_build, 1),
            "build_s": round(built - t0, 2), "draw_s": round(done - built, 2)}


def measure_train_loader(manifest_path, num_batches=100, batch_size=2, image_size=64, num_workers=0, stream=True,
                         timeout=1800):
    """Peak RSS (and times) of a fresh process that builds the train loader and draws the batches."""
    cmd = [sys.executable, "-m", __name__, "--measure", os.path.abspath(manifest_path),
           "--num-batches", str(num_batches), "--batch-size", str(batch_size), "--image-size", str(image_size),
           "--num-workers", str(num_workers)] + ([] if stream else ["--list"])
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"train-loader measurement of {manifest_path} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure", required=True, help="manifest.json of the store")
    ap.add_argument("--num-batches", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--list", action="store_true", help="measure the list path instead of the streaming one")
    a = ap.parse_args(argv)
    res = _measure(a.measure, a.num_batches, a.batch_size, a.image_size, a.num_workers, not a.list)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
