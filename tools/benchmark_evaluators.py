#!/usr/bin/env python
"""Time AR@k + mIoU + NMI/ARI evaluation of 500 parts-world-sized images x 200 proposals on one core.

    python tools/benchmark_evaluators.py [--num-images 500] [--size 192] [--proposals 200]
"""
import argparse
import json

import torch

from part_distill.benchmarks.evaluators import benchmark_evaluators


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--proposals", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="also write the metric tables here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    wall, cpu, results = benchmark_evaluators(args.num_images, args.size, args.proposals, args.seed,
                                              args.output_dir)
    print(json.dumps({"wall_seconds": {k: round(v, 2) for k, v in wall.items()},
                      "total_wall_seconds": round(sum(wall.values()), 2),
                      "cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
                      "total_cpu_seconds": round(sum(cpu.values()), 2),
                      "images": args.num_images, "size": args.size, "proposals": args.proposals}, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
