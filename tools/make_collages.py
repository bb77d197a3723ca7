#!/usr/bin/env python
"""Purity collages (paper Fig 5): a 3x3 grid of random instances per (object class, part cluster).

  python tools/make_collages.py --predictions preds.json --dataset parts_world_val --output output/collages/model
  python tools/make_collages.py --mined output/mined_parts --dataset parts_world_train --output output/collages/mined
  python tools/make_collages.py --gt-parts parts_world_val_parts --output output/collages/gt

--predictions: the record format of part_distill/visualization/records.py. --mined: a mined-parts
store (MINING.OUTPUT_DIR). --gt-parts: ground-truth parts as clusters (a perfectly pure reference).
The output dir (one PNG per cluster, index.json, index.html) is what tools/rate_parts.py serves.
"""
import argparse
import logging

import part_distill  # noqa: F401  (registers datasets)
from detectron2.data import DatasetCatalog, MetadataCatalog
from part_distill.mining.store import PartStore
from part_distill.visualization.collages import make_collages
from part_distill.visualization.records import (
    load_prediction_records, records_from_mined_shard, records_from_part_dataset)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--predictions", help="saved predictions JSON")
    src.add_argument("--mined", help="mined-parts store directory")
    src.add_argument("--gt-parts", help="a registered *_parts dataset")
    p.add_argument("--dataset", help="registered dataset whose thing_classes name the object classes")
    p.add_argument("--output", required=True)
    p.add_argument("--method", help="method name stored in index.json (the rating app's default name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile-size", type=int, default=160)
    p.add_argument("--margin", type=float, default=0.1, help="crop margin around the object, x its longer side")
    p.add_argument("--min-score", type=float, default=0.0)
    p.add_argument("--max-part-area-fraction", type=float, default=None,
                   help="drop parts larger than this fraction of their object (the paper uses 0.5)")
    p.add_argument("--image-root", help="prefix for relative file_name values")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    thing_classes = None
    if args.predictions:
        records, thing_classes = load_prediction_records(args.predictions)
    elif args.mined:
        store = PartStore(args.mined)
        shards = store.existing_shards()
        if not shards:
            raise SystemExit(f"no shards under {store.root}/shards: run tools/mine_parts.py first")
        records = [r for name in shards for r in records_from_mined_shard(store.read_shard(name))]
    else:
        records = records_from_part_dataset(DatasetCatalog.get(args.gt_parts))
        thing_classes = MetadataCatalog.get(args.gt_parts).thing_classes
    if args.dataset:
        thing_classes = MetadataCatalog.get(args.dataset).thing_classes
    if thing_classes is None:
        raise SystemExit("object class names unknown: pass --dataset NAME (a registered dataset)")
    index = make_collages(records, thing_classes, args.output, seed=args.seed, tile_size=args.tile_size,
                          margin=args.margin, min_score=args.min_score, method=args.method,
                          max_part_area_fraction=args.max_part_area_fraction, image_root=args.image_root)
    print(f"wrote {len(index['collages'])} collages to {args.output} (index.html, index.json); "
          f"skipped: {index['skipped'] or 'none'}")


if __name__ == "__main__":
    main()
