#!/usr/bin/env python
"""Part-mining ablation (paper Table 6 / Fig 6): AR@1/AR@10 of mined parts for each setting and feature source.

    python tools/mining_ablation.py --output docs/mining_ablation.md --num-images 40 \
        --teacher-weights output/instance_teacher/model_final.pth

Rewrites only the generated block of --output (the prose around it is kept). A missing teacher
checkpoint leaves the teacher columns "n/a"; a missing ../shared leaves out the Pascal-Part row.
"""
import argparse
import logging
import shlex
import sys

from detectron2.utils.logger import setup_logger

from part_distill.mining.ablation import run_ablation


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="docs/mining_ablation.md")
    parser.add_argument("--num-images", type=int, default=40, help="first N images of parts_world_val_parts")
    parser.add_argument("--teacher-weights", default="", help="instance-teacher checkpoint (model_final.pth)")
    parser.add_argument("--image-size", type=int, default=256, help="MINING.IMAGE_SIZE on the parts world")
    parser.add_argument("--shared-root", default=None, help="folder holding data/pascal_part_samples")
    args = parser.parse_args()
    setup_logger(name="part_distill", abbrev_name="pd")
    logging.getLogger("part_distill.mining.miner").setLevel(logging.WARNING)
    result = run_ablation(args.output, args.num_images, args.teacher_weights, args.image_size,
                          shared_root=args.shared_root,
                          command="python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"wrote {args.output} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
