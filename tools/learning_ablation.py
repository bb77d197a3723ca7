#!/usr/bin/env python
"""The learning ablation of docs/learning.md: freezing variant x schedule x whole images / object crops.

    python tools/learning_ablation.py --demo-output output/demo --output output/learning_ablation

Needs a finished `make demo` (its instance teacher and mined store are reused). Each variant reruns
stages 2 -> 2b -> 3 -> 4 (every step a tools/train_net.py command, logged under <output>/logs/,
skipped when done); the table goes to <output>/ablation.md and, with --doc, into the file's
learning-ablation block; the AR@200-vs-CPU-minutes plot goes to <output>/tradeoff.png (and --plot).
"""
import argparse
import os
import sys

from part_distill.drivers.learning_ablation import VARIANTS, build_ablation_steps, write_ablation_table
from part_distill.drivers.pipeline import StepFailed, record_timings, run_steps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-output", default="output/demo")
    p.add_argument("--output", default="output/learning_ablation")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--doc", default="", help="markdown file whose learning-ablation block gets the table")
    p.add_argument("--plot", default="", help="also write the AR@200-vs-CPU-minutes plot here (PNG)")
    p.add_argument("--num-gpus", type=int, default=0, help="processes per step (0: one CPU process)")
    args = p.parse_args()
    steps = build_ablation_steps(args.output, args.demo_output, args.variants, args.num_gpus)
    code = 0
    try:
        timings = run_steps(steps, os.path.join(args.output, "logs"))
    except StepFailed as e:
        print(e, file=sys.stderr)
        timings, code = e.timings, 1
    record_timings(args.output, timings)
    print(write_ablation_table(args.output, args.demo_output, args.variants, doc=args.doc or None,
                               plot=args.plot or None))
    sys.exit(code)


if __name__ == "__main__":
    main()
