#!/usr/bin/env python
"""How well a part model fits its training pseudo-labels (docs/learning.md), and its AR on val.

    python tools/fit_diagnostic.py --config-file configs/parts_world/proposal.yaml \
        --weights output/demo/proposal/model_final.pth --store output/demo/mined_train \
        --num-images 16 [--eval-dataset parts_world_val_parts] [--output fit.json] [KEY VALUE ...]

Prints (and with --output writes) the mean best IoU of the model's masks with each pseudo-label of
the first N store images, the percentage above 0.5 and, with --eval-dataset, the model's AR@k there.
The store is read with the config's DATASETS.PSEUDO_LABELS filters, as training reads it.
"""
import argparse
import json

from part_distill.data.pseudo_labels import PseudoLabelFilters
from part_distill.data.store_dataset import StoreDataset
from part_distill.engine.setup import build_cfg
from part_distill.engine.trainer import PartDistillTrainer
from part_distill.evaluation.fit import fit_to_pseudo_labels
from part_distill.modeling.checkpoint import PartDistillCheckpointer
from part_distill.utils.io import atomic_write_json


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", required=True, help="part model checkpoint")
    p.add_argument("--store", required=True, help="the pseudo-label store (directory or manifest.json) it trained on")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--eval-dataset", default="", help="also evaluate AR@k on this *_parts dataset")
    p.add_argument("--output", default="", help="JSON file for the figures")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args()
    cfg = build_cfg(args.config_file, ["MODEL.WEIGHTS", args.weights, *args.opts])
    model = PartDistillTrainer.build_model(cfg)
    PartDistillCheckpointer(model).load(args.weights)
    dicts = StoreDataset(args.store, PseudoLabelFilters.from_config(cfg), drop_empty=False)
    result = {"fit": fit_to_pseudo_labels(model, cfg, dicts, num_images=args.num_images)}
    if args.eval_dataset:
        cfg.defrost()
        cfg.DATASETS.TEST = (args.eval_dataset,)
        cfg.freeze()
        ar = PartDistillTrainer.test(cfg, model)
        result["eval"] = {k: v for task in ar.values() for k, v in task.items() if k.startswith("AR@")}
    if args.output:
        atomic_write_json(args.output, result, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
