#!/usr/bin/env python
"""Mine part pseudo-labels into a sharded COCO-format store (stage 1 of PartDistillation).

    python tools/mine_parts.py --config-file configs/parts_world/mine_parts.yaml
    python tools/mine_parts.py --config-file ... --num-gpus 2 MINING.FEATURES rgbxy MODEL.DEVICE cpu
    python tools/mine_parts.py --config-file ... --overwrite      # discard a store mined differently

Rerunning the same command resumes after the last complete shard. The store (shards/, run.json,
manifest.json) goes to MINING.OUTPUT_DIR (default OUTPUT_DIR/mined_parts).
"""
from detectron2.engine import default_argument_parser, launch

from part_distill.mining.miner import mining_main


if __name__ == "__main__":
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument("--overwrite", action="store_true",
                        help="delete shards mined with another configuration instead of refusing")
    args = parser.parse_args()
    print("Command Line Args:", args)
    launch(mining_main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
