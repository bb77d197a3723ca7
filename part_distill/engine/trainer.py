"""The one DefaultTrainer subclass that serves every stage; the stage is ``cfg.PART_DISTILL.STAGE``."""
import logging
import os

from detectron2.engine import DefaultTrainer
from detectron2.evaluation import DatasetEvaluators

logger = logging.getLogger(__name__)


class PartDistillTrainer(DefaultTrainer):
    """detectron2's DefaultTrainer with part_distill's evaluators and data mappers."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        from ..evaluation import build_evaluators  # local: evaluation registers lazily

        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluators = build_evaluators(cfg, dataset_name, output_folder)
        return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)
