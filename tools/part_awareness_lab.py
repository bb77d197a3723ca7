#!/usr/bin/env python
"""The part-awareness table in one command: probes of the ImageNet backbone before and after 1-3
PARTICLE iterations, and what the adapted backbone does to mined parts and to the final model.

    python tools/part_awareness_lab.py --output output/part_awareness --demo-output output/demo

Reuses (or runs) the demo's pipeline for the ImageNet row; every step is skipped when its result
exists. Writes <output>/part_awareness.md / .csv.
"""
import argparse
import os
import sys

from part_distill.drivers.part_awareness_lab import build_lab_steps, write_lab_table
from part_distill.drivers.pipeline import StepFailed, run_steps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="output/part_awareness")
    p.add_argument("--demo-output", default="output/demo", help="the ImageNet pipeline (make demo's output)")
    p.add_argument("--iterations", type=int, default=3, help="PARTICLE iterations (1-3 in the table)")
    p.add_argument("--num-gpus", type=int, default=0)
    args = p.parse_args()
    steps = build_lab_steps(args.output, args.demo_output, args.iterations, args.num_gpus)
    try:
        run_steps(steps, os.path.join(args.output, "logs"))
    except StepFailed as e:
        print(e, file=sys.stderr)
        sys.exit(1)
    print(write_lab_table(args.output, args.demo_output, args.iterations))


if __name__ == "__main__":
    main()
