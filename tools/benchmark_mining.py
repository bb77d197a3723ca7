#!/usr/bin/env python
"""End-to-end part-mining throughput (images/s, features to stored RLE) with a time breakdown.

    python tools/benchmark_mining.py --features rgbxy --num-images 50
    python tools/benchmark_mining.py --features res3_res4 --num-images 50 --image-size 640 [--crf] [--device cuda]

Mines the first N images of parts_world_val (generated under $DETECTRON2_DATASETS if missing) with
GT objects into a temporary store; the first batch is a warm-up and is not timed. Stages:
read+objects (image decode + object masks), features (resize + extractor), kmeans (fit),
assign (full-resolution labels), crf, part_masks, encode+write (RLE + JSON shard).
"""
import argparse
import tempfile
import time

import torch

import part_distill  # noqa: F401  (registers datasets and backbones)
from detectron2.data import DatasetCatalog
from part_distill.engine.setup import build_cfg
from part_distill.mining.miner import PartMiner, mine_parts

BACKBONE_OPTS = ["MODEL.BACKBONE.NAME", "build_efficientnet_lite_backbone", "INPUT.FORMAT", "RGB",
                 "MODEL.PIXEL_MEAN", "[127.5, 127.5, 127.5]", "MODEL.PIXEL_STD", "[127.5, 127.5, 127.5]",
                 "MODEL.EFFICIENTNET.OUT_FEATURES", '["res3", "res4"]']


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", default="rgbxy")
    p.add_argument("--num-images", type=int, default=50)
    p.add_argument("--image-size", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--crf", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    name = "benchmark_mining_subset"
    with tempfile.TemporaryDirectory() as out:
        opts = ["MODEL.DEVICE", a.device, "MINING.FEATURES", a.features, "MINING.IMAGE_SIZE", str(a.image_size),
                "MINING.BATCH_SIZE", str(a.batch_size), "MINING.SHARD_SIZE", str(a.batch_size),
                "MINING.DATASETS", f'("{name}",)', "MINING.OUTPUT_DIR", out, "MINING.CRF.ENABLED", str(a.crf)]
        cfg = build_cfg("", opts + (BACKBONE_OPTS if a.features != "rgbxy" else []))
        dicts = [dict(d, _mining_dataset=name) for d in DatasetCatalog.get("parts_world_val")]
        if len(dicts) < a.batch_size + a.num_images:
            raise SystemExit(f"parts_world_val has {len(dicts)} images; need {a.batch_size + a.num_images}")
        miner = PartMiner(cfg)
        # Warm-up batch (not timed): lazy init, allocator, thread and CRF pools.
        miner.mine_batch(list(enumerate(dicts[: a.batch_size])), 0)
        miner.timers.clear()
        DatasetCatalog.register(name, lambda: dicts[a.batch_size: a.batch_size + a.num_images])
        start = time.perf_counter()
        m = mine_parts(cfg, miner=miner)
        total = time.perf_counter() - start
    c = m["counts"]
    print(f"features={a.features} image_size={a.image_size} device={a.device} crf={a.crf} "
          f"threads={torch.get_num_threads()}: {c['images']} images, {c['instances']} objects, {c['parts']} parts")
    print(f"end-to-end: {total:.2f} s = {c['images'] / total:.2f} images/s")
    for k, v in sorted(miner.timers.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<14} {v:7.2f} s  {100 * v / total:5.1f}%  {1000 * v / max(c['images'], 1):7.1f} ms/img")


if __name__ == "__main__":
    main()
