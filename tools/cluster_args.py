#!/usr/bin/env python
"""Print detectron2's multi-node launch flags for this SLURM step or torchrun worker (docs/clusters.md):

    srun --ntasks-per-node=1 bash -c 'python tools/train_net.py --config-file ... $(python tools/cluster_args.py)'
"""
import sys

from part_distill.utils.cluster import main

if __name__ == "__main__":
    sys.exit(main())
