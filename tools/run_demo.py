#!/usr/bin/env python
"""The whole PartDistillation pipeline on the synthetic parts world, on CPU (what `make demo` runs).

    python tools/run_demo.py --output output/demo

Every step is a user-facing command (printed, logged under <output>/logs/) and is skipped when
its result already exists, so a second run only re-prints the results. Delete <output> (or the
step's directory) to redo a step. Metrics land in <output>/results.md and the README's table.
"""
import argparse
import os
import sys

from part_distill.engine.demo import build_demo_steps, write_demo_report
from part_distill.engine.pipeline import StepFailed, run_steps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="output/demo")
    p.add_argument("--num-gpus", type=int, default=0, help="processes per step (0: one CPU process)")
    p.add_argument("--until", default="", help="stop after the step with this name")
    args = p.parse_args()
    steps = build_demo_steps(args.output, num_gpus=args.num_gpus)
    if args.until:
        names = [s.name for s in steps]
        if args.until not in names:
            p.error(f"--until must be one of {names}")
        steps = steps[: names.index(args.until) + 1]
    try:
        timings = run_steps(steps, os.path.join(args.output, "logs"))
    except StepFailed as e:
        print(e, file=sys.stderr)
        sys.exit(1)
    print(write_demo_report(args.output, timings, readme="README.md"))
    print(f"Report: {os.path.join(args.output, 'report.html')}")


if __name__ == "__main__":
    main()
