#!/usr/bin/env python
"""Few-shot table (paper Table 4): fine-tune from several initialisations on a percentage of the target
dataset's part labels and evaluate on its test split; one table per target dataset (supervised config).

    # parts world (default config, 1/10/100 %)
    python tools/few_shot.py --ours output/demo/distill/round_0/model_final.pth \
        --teacher output/demo/instance_teacher/model_final.pth --output output/few_shot
    # a real target dataset at the paper's percentages, plus any other checkpoint as its own row
    python tools/few_shot.py --config-file configs/few_shot/pascal_part.yaml --percents 1 5 10 20 50 100 \
        --ours output/imagenet/distill/round_0/model_final.pth \
        --teacher checkpoints/mask2former/model_final_e5f453.pkl \
        --init supervised_pin=output/few_shot/part_imagenet/teacher/pct100/model_final.pth \
        --output output/few_shot/pascal_part

Each cell is a tools/train_net.py run (log: <output>/logs/<init>_pct<p>.log) skipped when its
eval_results.json exists; trailing KEY VALUE pairs go to every run (e.g. SOLVER.MAX_ITER 200).
Writes <output>/few_shot.md and <output>/few_shot.json.
"""
import argparse
import os
import sys
import time

from part_distill.drivers.few_shot_table import (DEFAULT_CONFIG, DEFAULT_PERCENTS, build_few_shot_steps,
                                                collect_few_shot, write_few_shot_table)
from part_distill.drivers.pipeline import StepFailed, run_steps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ours", default="", help="PartDistillation checkpoint (stage 4) to start from")
    p.add_argument("--teacher", default="", help="instance-teacher checkpoint to start from")
    p.add_argument("--init", action="append", default=[], metavar="NAME=PATH",
                   help="another initialisation, a row of its own (repeatable)")
    p.add_argument("--output", default="output/few_shot")
    p.add_argument("--config-file", default=DEFAULT_CONFIG)
    p.add_argument("--percents", type=float, nargs="+", default=list(DEFAULT_PERCENTS))
    p.add_argument("--dataset", default="", help="label of the table's Finetune column (default: "
                   "parts_world_train_parts for the default config, else the config file's name)")
    p.add_argument("--num-gpus", type=int, default=0, help="processes per run (0: one CPU process)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides for every run")
    args = p.parse_args()
    weights = {k: v for k, v in (("ours", args.ours), ("teacher", args.teacher)) if v}
    for item in args.init:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"--init {item!r}: expected NAME=PATH")
        weights[name] = path
    if not weights:
        p.error("give --ours, --teacher and/or --init NAME=PATH")
    dataset = args.dataset or ("parts_world_train_parts" if args.config_file == DEFAULT_CONFIG
                               else os.path.splitext(os.path.basename(args.config_file))[0])
    launch = ["--num-gpus", str(args.num_gpus)] if args.num_gpus > 1 else []
    steps = build_few_shot_steps(args.output, weights, args.percents, args.config_file, args.opts, launch)
    start = time.perf_counter()
    try:
        timings = run_steps(steps, os.path.join(args.output, "logs"))
    except StepFailed as e:
        print(e, file=sys.stderr)
        sys.exit(1)
    wall = time.perf_counter() - start
    ran = [t for t in timings.values() if t != "skipped"]
    note = (f"{len(ran)} runs in {wall / 60:.1f} min wall ({len(timings) - len(ran)} already done); "
            f"config {args.config_file} {' '.join(args.opts)}".rstrip())
    results = collect_few_shot(args.output, weights, args.percents)
    print(write_few_shot_table(args.output, results, args.percents, dataset, [note]))
    print(f"Table: {os.path.join(args.output, 'few_shot.md')}")


if __name__ == "__main__":
    main()
