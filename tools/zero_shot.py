#!/usr/bin/env python
"""Zero-shot tables (paper Tables 2 and 3): evaluate one checkpoint on Pascal-Part, PartImageNet and
Cityscapes-Parts with its own (predicted) objects and with GT objects.

    python tools/zero_shot.py --weights output/imagenet/distill/round_0/model_final.pth \
        --output output/zero_shot

Each cell is a ``tools/train_net.py --eval-only`` run (log: <output>/logs/<dataset>_<pred|gt>.log),
skipped when its eval_results.json exists. A dataset whose files are not under $DETECTRON2_DATASETS
is a counted skip ("not found: <path>" in its row). Trailing KEY VALUE pairs go to every run.
Writes <output>/zero_shot.{md,csv} (Table 3) and <output>/zero_shot_nmi_ari.{md,csv} (Table 2).
"""
import argparse
import os
import sys
import time

from part_distill.drivers.pipeline import StepFailed, run_steps
from part_distill.drivers.zero_shot import (DEFAULT_CONFIG, DEFAULT_DATASETS, NMI_ARI_DATASET, PRED_OBJECT_SCORE,
                                            build_zero_shot_steps, collect_zero_shot, write_zero_shot_tables)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="checkpoint to evaluate (e.g. stage 4's model_final.pth)")
    p.add_argument("--config-file", default=DEFAULT_CONFIG, help="config of the checkpoint's model")
    p.add_argument("--output", default="output/zero_shot")
    p.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS), help="registered *_parts datasets")
    p.add_argument("--nmi-ari-dataset", default=NMI_ARI_DATASET, help="dataset of the per-class NMI/ARI table")
    p.add_argument("--object-score", type=float, default=PRED_OBJECT_SCORE,
                   help="predicted objects scoring below this own no parts")
    p.add_argument("--num-gpus", type=int, default=0, help="processes per run (0: one CPU process)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides for every run")
    args = p.parse_args()
    launch = ["--num-gpus", str(args.num_gpus)] if args.num_gpus > 1 else []
    steps, skipped = build_zero_shot_steps(args.output, args.weights, args.datasets, args.config_file, args.opts,
                                           launch, args.object_score)
    for name, path in skipped.items():
        print(f"{name}: skipped, not found: {path}")
    start = time.perf_counter()
    try:
        timings = run_steps(steps, os.path.join(args.output, "logs"))
    except StepFailed as e:
        print(e, file=sys.stderr)
        sys.exit(1)
    ran = [t for t in timings.values() if t != "skipped"]
    note = (f"{len(ran)} runs in {(time.perf_counter() - start) / 60:.1f} min wall "
            f"({len(timings) - len(ran)} already done); weights {args.weights}; config {args.config_file} "
            f"{' '.join(args.opts)}".rstrip())
    results = collect_zero_shot(args.output, args.datasets)
    print(write_zero_shot_tables(args.output, results, skipped, args.datasets, args.nmi_ari_dataset, [note]))
    print(f"Tables: {os.path.join(args.output, 'zero_shot.md')}")


if __name__ == "__main__":
    main()
