#!/usr/bin/env python
"""Peak RSS of building the train loader of a part store and drawing batches, at several store sizes.

Writes synthetic stores (part_distill/data/store_simulation.py; kept under --root and reused) and
measures, each in a fresh process with DATALOADER.NUM_WORKERS 0 (so the dataset lives in the
measured process), the streaming path the trainer uses and, with --list, the old list path.

  python tools/benchmark_train_loader.py                               # 10^3 and 10^5 images, 100 batches
  python tools/benchmark_train_loader.py --sizes 1000 10000 100000 --list --json output/train_loader.json
  python tools/benchmark_train_loader.py --audit --json output/scale/audit.json   # docs/scale.md, item 3

--audit runs part_distill/benchmarks/scale_audit.py instead: manifests of --shards one-image shards,
evaluator records per image, the dataset-level k-means sample, collages and ratings.
"""
import argparse
import json
import os
import time

from part_distill.data.store_simulation import measure_train_loader, write_synthetic_store


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 100000])
    p.add_argument("--root", default="output/scale/stores", help="where the synthetic stores are written")
    p.add_argument("--num-batches", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--list", action="store_true", help="also measure the list path (load_pseudo_labels)")
    p.add_argument("--json", default="", help="also write the rows to this file")
    p.add_argument("--audit", action="store_true", help="run the item-3 audit measurements instead")
    p.add_argument("--shards", type=int, default=100000, help="--audit: shards of the manifest check")
    p.add_argument("--collage-classes", type=int, default=250, help="--audit: classes (x 8 clusters) of collages")
    args = p.parse_args()
    rows = _audit(args) if args.audit else _loader(args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def _audit(args):
    from part_distill.benchmarks import scale_audit as a

    root = os.path.join(args.root, "audit")
    steps = [
        ("evaluation", lambda: a.audit_evaluation(200)),
        ("point_sample_1e4", lambda: a.audit_point_sample(10000, 200, 64, 100, 2000)),
        ("point_sample_4e4", lambda: a.audit_point_sample(40000, 200, 64, 100, 2000)),
        ("ratings_80k", lambda: a.audit_ratings(os.path.join(root, "ratings.db"), 80000)),
        ("collages_traced", lambda: a.audit_collages(os.path.join(root, "collages_small"), 20, trace=True)),
        ("collages", lambda: a.audit_collages(os.path.join(root, "collages"), args.collage_classes)),
        ("manifest_summaries", lambda: a.audit_manifest_summaries(os.path.dirname(_loader_store(args, 100000)))),
        ("manifest", lambda: a.audit_manifest(os.path.join(root, f"manifest_{args.shards}"), args.shards,
                                              trace=args.shards <= 20000)),
    ]
    rows = {}
    for name, fn in steps:
        if name == "ratings_80k" and os.path.exists(os.path.join(root, "ratings.db")):
            os.unlink(os.path.join(root, "ratings.db"))
        os.makedirs(root, exist_ok=True)
        rows[name] = fn()
        print(name, json.dumps(rows[name]), flush=True)
    return rows


def _loader_store(args, n):
    return write_synthetic_store(os.path.join(args.root, f"store_{n}"), n)


def _loader(args):
    rows = []
    for n in args.sizes:
        t0 = time.perf_counter()
        manifest = _loader_store(args, n)
        gen = time.perf_counter() - t0
        for stream in (True, False) if args.list else (True,):
            # Twice for the stream: the first run scans the shards, the second maps the cached index.
            for attempt in range(2 if stream else 1):
                r = measure_train_loader(manifest, args.num_batches, args.batch_size, stream=stream)
                r.update(path="stream" if stream else "list", cached_index=bool(stream and attempt),
                         generate_s=round(gen, 1))
                rows.append(r)
                print(f"{n:>8} images  {r['path']:6} {'cached' if r['cached_index'] else 'scan  '}  "
                      f"peak RSS {r['peak_rss_mb']:7.1f} MB  (+{r['peak_rss_mb'] - r['rss_before_build_mb']:6.1f} "
                      f"over the process before the loader)  build {r['build_s']:6.2f} s  "
                      f"{args.num_batches} batches {r['draw_s']:5.2f} s", flush=True)
    return rows


if __name__ == "__main__":
    main()
