#!/usr/bin/env python
"""Evaluate a part store (mined parts or self-training labels) on a `*_parts` dataset.

    python tools/evaluate_parts.py --store output/demo/mined_val --dataset parts_world_val_parts \
        --output output/demo/eval/mined [KEY VALUE ...]

Models are evaluated with `tools/train_net.py --eval-only`; this covers the "mined parts only"
baseline, which has no model. Prints the metrics and writes CSV/markdown tables and eval_results.json.
"""
import argparse
import json
import os

from part_distill.data.datasets.parts_world import register_parts_world_from_config
from part_distill.engine.setup import build_cfg
from part_distill.evaluation.store_predictions import evaluate_store
from part_distill.utils.io import atomic_write_json


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="store directory or its manifest.json")
    p.add_argument("--dataset", required=True, help="registered *_parts dataset with the ground truth")
    p.add_argument("--output", required=True, help="directory for the tables and eval_results.json")
    p.add_argument("--config-file", default="", help="optional config (TEST.PARTS.* options)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args()
    cfg = build_cfg(args.config_file, args.opts)
    register_parts_world_from_config(cfg)  # parts_world_* = the world of the given PARTS_WORLD.*
    results = evaluate_store(cfg, args.store, args.dataset, args.output)
    atomic_write_json(os.path.join(args.output, "eval_results.json"), results, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
