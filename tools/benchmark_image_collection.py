#!/usr/bin/env python
"""Time indexing a Detic-format results file and building an image collection from its cached index.

    python tools/benchmark_image_collection.py --images 20000 --per-image 10

Writes a synthetic ImageNet-layout folder (empty files: no image is opened when loading) and one
results file (375x500 RLE masks, random scores and LVIS-sized class ids) to a temporary folder.
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np
from pycocotools import mask as mask_util

from part_distill.data.datasets.detection_results import INDEX_SUFFIX, load_results_index
from part_distill.data.datasets.image_collection import build_image_collection


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--per-image", type=int, default=10)
    p.add_argument("--classes", type=int, default=1203)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        root = os.path.join(d, "train", "n00000000")
        os.makedirs(root)
        for i in range(a.images):
            open(os.path.join(root, f"im_{i:07d}.JPEG"), "wb").close()
        m = np.zeros((375, 500), np.uint8)
        m[50:300, 80:400] = 1
        seg = {"size": [375, 500], "counts": mask_util.encode(np.asfortranarray(m))["counts"].decode()}
        path, vocab = os.path.join(d, "results.json"), os.path.join(d, "vocabulary.json")
        with open(path, "w") as f:
            json.dump([{"file_name": f"n00000000/im_{i:07d}.JPEG", "category_id": int(rng.integers(a.classes)),
                        "segmentation": seg, "score": float(rng.random())}
                       for i in range(a.images) for _ in range(a.per_image)], f)
        with open(vocab, "w") as f:
            json.dump([f"class_{c}" for c in range(a.classes)], f)
        mib = os.path.getsize(path) / 2**20
        t = time.perf_counter()
        load_results_index(path)
        t_index = time.perf_counter() - t
        t = time.perf_counter()
        with open(path) as f:
            json.load(f)
        t_json = time.perf_counter() - t
        t = time.perf_counter()
        dicts, counts = build_image_collection(os.path.join(d, "train"), [path], vocab, score_thresh=0.5, topn=20)
        t_load = time.perf_counter() - t
        kept = sum(len(x["annotations"]) for x in dicts)
        print(f"{a.images * a.per_image} rows, {mib:.1f} MiB: index {t_index:.2f} s (json.load of the file "
              f"{t_json:.2f} s, index {os.path.getsize(path + INDEX_SUFFIX) / 2**20:.1f} MiB); collection from the "
              f"cached index {t_load:.2f} s ({counts['images_kept']} images, {kept} objects)")


if __name__ == "__main__":
    main()
