#!/usr/bin/env python
"""Part-awareness probes of a frozen backbone: grouping AR@1/AR@10, linear part mIoU, part retrieval mAP.

    python tools/probe_backbone.py --config-file configs/parts_world/probe.yaml
    python tools/probe_backbone.py --config-file configs/parts_world/probe.yaml \
        --weights "EffNet-Lite0 ImageNet=" --weights "PARTICLE it1=output/particle/model_final.pth"
    python tools/probe_backbone.py --config-file configs/parts_world/probe.yaml --label "R50-GN random" \
        MODEL.BACKBONE.NAME build_resnet_backbone MODEL.RESNETS.NORM GN ...

Each run is one row; rows are added to (or, same label, replaced in) the table of --output
(probe_table.md / .csv, probe_results.json) unless --fresh. Single process (no --num-gpus).
"""
import logging

from detectron2.utils.logger import setup_logger

from part_distill.probes.cli import build_parser, probe_main


if __name__ == "__main__":
    args = build_parser(epilog=__doc__).parse_args()
    setup_logger(name="part_distill", abbrev_name="pd")
    logging.getLogger("part_distill.mining.miner").setLevel(logging.WARNING)
    print(probe_main(args))
