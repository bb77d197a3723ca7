"""``main(args)`` behind tools/train_net.py: build the config, then run the configured stage."""
import logging
import os

from ..modeling.checkpoint import PartDistillCheckpointer
from detectron2.utils import comm

from ..utils.io import atomic_write_json
from .setup import setup
from .stages import STAGE_RUNNERS, run_stage
from .trainer import PartDistillTrainer

logger = logging.getLogger("part_distill")


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = PartDistillTrainer.build_model(cfg)
        PartDistillCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = PartDistillTrainer.test(cfg, model)
        if comm.is_main_process():
            logger.info("Evaluation results: %s", res)
            # The pipeline driver and report read this file; the tables sit beside it.
            atomic_write_json(os.path.join(cfg.OUTPUT_DIR, "eval_results.json"), res, indent=1)
        return res
    if cfg.PART_DISTILL.STAGE in STAGE_RUNNERS:
        # The PartDistillation stages resume by default: their rounds and label shards skip finished work.
        return run_stage(cfg, resume=args.resume or cfg.PART_DISTILL.STAGE != "proposal")
    trainer = PartDistillTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # DefaultTrainer.train() returns its last evaluation only when TEST.EXPECTED_RESULTS is set.
    res = getattr(trainer, "_last_eval_results", None)
    if comm.is_main_process() and res:
        atomic_write_json(os.path.join(cfg.OUTPUT_DIR, "eval_results.json"), res, indent=1)
    return res
