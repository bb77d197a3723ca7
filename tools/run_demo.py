#!/usr/bin/env python
"""The whole PartDistillation pipeline on the synthetic parts world, on CPU (what `make demo` runs).

    python tools/run_demo.py --output output/demo

Every step is a user-facing command (printed, logged under <output>/logs/) and is skipped when
its result already exists, so a second run only re-prints the results. Delete <output> (or the
step's directory) to redo a step. Metrics land in <output>/results.md and the README's table.
When a step fails, results.md and report.html still show every finished step and name the failed
one and its log (the README is left alone), the command exits 1, and a re-run resumes at that step.
"""
import argparse
import os
import sys

from part_distill.drivers.demo import build_demo_steps, write_demo_report
from part_distill.drivers.pipeline import StepFailed, record_timings, run_steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="output/demo")
    p.add_argument("--num-gpus", type=int, default=0, help="processes per step (0: one CPU process)")
    p.add_argument("--until", default="", help="stop after the step with this name")
    args = p.parse_args(argv)
    steps = build_demo_steps(args.output, num_gpus=args.num_gpus)
    if args.until:
        names = [s.name for s in steps]
        if args.until not in names:
            p.error(f"--until must be one of {names}")
        steps = steps[: names.index(args.until) + 1]
    failed = None
    try:
        timings = run_steps(steps, os.path.join(args.output, "logs"))
    except StepFailed as e:
        print(e, file=sys.stderr)
        timings, failed = e.timings, e
    # The learning ablation reads the demo's stage times from <output>/timings.json; the report shows
    # every step's time as last run, so a resumed demo still reports them.
    timings = record_timings(args.output, timings)
    # Only a whole run may stand in the README.
    print(write_demo_report(args.output, timings, readme=None if args.until else "README.md", failed=failed))
    print(f"Report: {os.path.join(args.output, 'report.html')}")
    if failed is not None:
        sys.exit(f"step {failed.step} failed (log: {failed.log_path}); the report shows the finished steps. "
                 "Fix the cause and run again to resume at that step.")


if __name__ == "__main__":
    main()
