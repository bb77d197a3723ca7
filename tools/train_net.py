#!/usr/bin/env python
"""One entry point for every part_distill stage (detectron2's DefaultTrainer + launch pattern).

    python tools/train_net.py --config-file configs/parts_world/instance_teacher.yaml
    python tools/train_net.py --config-file ... --num-gpus 8 --num-machines 2 --machine-rank 0 \
        --dist-url tcp://host:port
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS path/to/model.pth

The stage run is the config key PART_DISTILL.STAGE; trailing KEY VALUE pairs override the config.
"""
from detectron2.engine import default_argument_parser, launch

from part_distill.engine.main import main


if __name__ == "__main__":
    args = default_argument_parser(epilog=__doc__).parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
