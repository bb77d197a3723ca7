#!/usr/bin/env python
"""End-to-end part-mining throughput (images/s, features to stored RLE) with a time breakdown.

    python tools/benchmark_mining.py --features rgbxy --num-images 50
    python tools/benchmark_mining.py --features res3_res4 --num-images 50 --image-size 640 [--crf] [--device cuda]
    python tools/benchmark_mining.py --features res3_res4 --backbone r50 --device cuda --json out.json

Mines the first N images of parts_world_val (generated under $DETECTRON2_DATASETS if missing) with
GT objects into a temporary store; the first batch is a warm-up and is not timed. Stages:
read+objects (image decode + object masks), features (resize + extractor), points (object coverage
-> weighted k-means points), kmeans (fit),
assign (full-resolution labels), crf, part_masks, encode+write (RLE + JSON shard).

Roofline, measured in the same run (stream read bandwidth, fp32 matmul peak, load average):
  * features: the extractor's flops (counted on one batch, torch's FlopCounterMode) at the matmul
    peak, and the bytes of the feature grids written once;
  * kmeans: one read of the clustered points per Lloyd iteration plus one for the seeding, and the
    k-means flops at the peak; beside it the peer, per-instance scikit-learn KMeans, timed on a
    sample of the same instances and extrapolated to all of them.
Each stage's fraction = limit / time; the end-to-end fraction counts these two stages' limits only.
"""
import argparse
import tempfile
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import part_distill  # noqa: F401  (registers datasets and backbones)
from detectron2.data import DatasetCatalog
from part_distill.engine.setup import build_cfg
from part_distill.mining.kmeans import kmeans_flops
from part_distill.mining.miner import PartMiner, mine_parts
from part_distill.utils.native import native_status
from part_distill.utils.roofline import MachineLimits, load_average, roofline, write_report

BACKBONE_OPTS = ["MODEL.BACKBONE.NAME", "build_efficientnet_lite_backbone", "INPUT.FORMAT", "RGB",
                 "MODEL.PIXEL_MEAN", "[127.5, 127.5, 127.5]", "MODEL.PIXEL_STD", "[127.5, 127.5, 127.5]",
                 "MODEL.EFFICIENTNET.OUT_FEATURES", '["res3", "res4"]']
# detectron2's ResNet-50 (random init: timing only), the issue's GPU size.
R50_OPTS = ["MODEL.BACKBONE.NAME", "build_resnet_backbone", "MODEL.RESNETS.DEPTH", "50",
            "MODEL.RESNETS.OUT_FEATURES", '["res3", "res4"]']


class _KMeansRecorder:
    """Wraps the miner's BatchedKMeans: counts clustered points and iterations, keeps a sample."""

    def __init__(self, kmeans, keep=40):
        self.kmeans, self.keep = kmeans, keep
        self.points = self.dims = self.instances = 0
        self.iter_points = 0.0  # sum over instances of points x iterations
        self.sample = []

    def __getattr__(self, name):
        return getattr(self.kmeans, name)

    def fit(self, feats, valid, weights=None, **kw):
        res = self.kmeans.fit(feats, valid, weights=weights, **kw)
        n = valid.sum(1)
        self.points += int(n.sum())
        self.dims = feats.shape[-1]
        self.instances += int((~res.skipped).sum())
        self.iter_points += float((n * res.n_iter).sum())
        for i in range(feats.shape[0]):
            if len(self.sample) < self.keep and not bool(res.skipped[i]):
                m = valid[i]
                self.sample.append((feats[i][m].cpu().double().numpy(), weights[i][m].cpu().double().numpy()))
        return res


def _sklearn_per_instance(sample, kmeans):
    """Seconds per instance of scikit-learn KMeans (the reference's miner) on recorded instances."""
    from sklearn.cluster import KMeans

    t0 = time.perf_counter()
    for x, w in sample:
        if kmeans.metric == "cosine":
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        KMeans(kmeans.num_clusters, n_init=1, max_iter=kmeans.max_iter, tol=kmeans.tol,
               random_state=0).fit(x, sample_weight=w)
    return (time.perf_counter() - t0) / max(len(sample), 1)


def _feature_flops(miner, batch_size, image_size):
    """Flops of the feature extractor on one padded batch, and the grid's bytes per image."""
    div = miner.features.size_divisibility
    side = -(-image_size // div) * div
    x = torch.zeros(batch_size, 3, side, side, device=miner.device)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        out = miner.features(x)
    return fc.get_total_flops() / batch_size, out[0].numel() * out.element_size()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", default="rgbxy")
    p.add_argument("--num-images", type=int, default=50)
    p.add_argument("--image-size", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--crf", action="store_true")
    p.add_argument("--backbone", default="effnet", choices=["effnet", "r50"],
                   help="backbone of res3_res4 features: EfficientNet-Lite0 or detectron2's R50")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--skip-sklearn", action="store_true", help="do not time the scikit-learn peer")
    p.add_argument("--kmeans-backend", default="auto", choices=["auto", "native", "torch"],
                   help="MINING.KMEANS_BACKEND: the compiled CPU kernel or the torch path")
    p.add_argument("--json", default="", help="also write all figures to this JSON file ('-' = stdout)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    limits = MachineLimits(a.device)
    print(limits)
    print(f"k-means backend {a.kmeans_backend}; {native_status()}")
    name = "benchmark_mining_subset"
    with tempfile.TemporaryDirectory() as out:
        opts = ["MODEL.DEVICE", a.device, "MINING.FEATURES", a.features, "MINING.IMAGE_SIZE", str(a.image_size),
                "MINING.BATCH_SIZE", str(a.batch_size), "MINING.SHARD_SIZE", str(a.batch_size),
                "MINING.DATASETS", f'("{name}",)', "MINING.OUTPUT_DIR", out, "MINING.CRF.ENABLED", str(a.crf),
                "MINING.KMEANS_BACKEND", a.kmeans_backend]
        extra = [] if a.features == "rgbxy" else (R50_OPTS if a.backbone == "r50" else BACKBONE_OPTS)
        cfg = build_cfg("", opts + extra)
        dicts = [dict(d, _mining_dataset=name) for d in DatasetCatalog.get("parts_world_val")]
        if len(dicts) < a.batch_size + a.num_images:
            raise SystemExit(f"parts_world_val has {len(dicts)} images; need {a.batch_size + a.num_images}")
        miner = PartMiner(cfg)
        # Warm-up batch (not timed): lazy init, allocator, thread and CRF pools.
        miner.mine_batch(list(enumerate(dicts[: a.batch_size])), 0)
        miner.timers.clear()
        flops_img, grid_bytes = _feature_flops(miner, a.batch_size, a.image_size)
        rec = miner.kmeans = _KMeansRecorder(miner.kmeans)
        DatasetCatalog.register(name, lambda: dicts[a.batch_size: a.batch_size + a.num_images])
        start = time.perf_counter()
        m = mine_parts(cfg, miner=miner)
        total = time.perf_counter() - start
    c = m["counts"]
    n_img = max(c["images"], 1)
    t = miner.timers
    elem = 4
    # One read per Lloyd iteration + one for the seeding; flops as in benchmark_kmeans.
    km_bytes = (rec.iter_points + rec.points) * rec.dims * elem
    km_flops = kmeans_flops(rec.points, rec.dims, rec.num_clusters, rec.iter_points / max(rec.points, 1))
    stages = {
        "features": roofline(t.get("features", 0.0), nbytes=n_img * grid_bytes, flops=n_img * flops_img,
                             bandwidth=limits.bandwidth, peak=limits.peak),
        "kmeans": roofline(t.get("kmeans", 0.0), nbytes=km_bytes, flops=km_flops,
                           bandwidth=limits.bandwidth, peak=limits.peak),
    }
    counted = sum(v["limit_s"] for v in stages.values())
    peer = None
    if not a.skip_sklearn and rec.sample:
        peer = _sklearn_per_instance(rec.sample, rec.kmeans) * rec.instances
    print(f"features={a.features} backbone={a.backbone if a.features != 'rgbxy' else '-'} "
          f"image_size={a.image_size} device={a.device} crf={a.crf} threads={torch.get_num_threads()}: "
          f"{c['images']} images, {c['instances']} objects, {c['parts']} parts; load {load_average()}")
    print(f"end-to-end: {total:.2f} s = {c['images'] / total:.2f} images/s; roofline of features + kmeans "
          f"{counted:.2f} s = {100 * counted / total:.1f} % of the total")
    for k, v in sorted(t.items(), key=lambda kv: -kv[1]):
        line = f"  {k:<14} {v:7.2f} s  {100 * v / total:5.1f}%  {1000 * v / n_img:7.1f} ms/img"
        if k in stages:
            r = stages[k]
            line += (f"  limit {1000 * r['limit_s'] / n_img:7.2f} ms/img ({r['bound']}-bound) "
                     f"-> {100 * r['fraction']:.1f} % of it")
        print(line)
    print(f"  feature extractor: {flops_img / 1e9:.1f} GFLOP/img; k-means: {rec.instances} instances, "
          f"{rec.points} points x {rec.dims} d, {rec.iter_points / max(rec.points, 1):.1f} iterations/point")
    if peer is not None:
        print(f"  peer: per-instance scikit-learn KMeans on the same instances (timed on {len(rec.sample)}): "
              f"{peer:.2f} s = {peer / max(t.get('kmeans', 0.0), 1e-9):.1f}x our kmeans stage")
    if a.json:
        out = {"tool": "benchmark_mining", "args": vars(a), "machine": limits.as_dict(), "counts": c,
               "native": native_status(),
               "total_s": total, "images_per_s": c["images"] / total, "timers_s": dict(t),
               "roofline": stages, "feature_gflop_per_image": flops_img / 1e9,
               "kmeans": {"instances": rec.instances, "points": rec.points, "dims": rec.dims,
                          "sklearn_s": peer}, "load_average_end": load_average()}
        write_report(out, a.json, default=str)


if __name__ == "__main__":
    main()
