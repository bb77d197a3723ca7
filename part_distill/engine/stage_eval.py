"""What every training stage does once it has its final model: evaluate it on DATASETS.TEST.

Shared by the stage runners (stages.py, one_stage.py, supervised.py) so none of them imports another.
"""
import logging

from detectron2.utils import comm

from ..modeling.checkpoint import PartDistillCheckpointer
from .trainer import PartDistillTrainer

__all__ = ["evaluate_stage", "load_final_model"]

logger = logging.getLogger(__name__)


def evaluate_stage(cfg, model):
    """Results of ``model`` on ``cfg.DATASETS.TEST`` (``{}`` when TEST has no dataset)."""
    if not cfg.DATASETS.TEST:
        return {}
    res = PartDistillTrainer.test(cfg, model)
    if comm.is_main_process():
        logger.info("Evaluation of stage %s: %s", cfg.PART_DISTILL.STAGE, res)
    return res


def load_final_model(cfg, weights):
    """The model of ``cfg`` with the checkpoint ``weights`` loaded (a stage's last round)."""
    model = PartDistillTrainer.build_model(cfg)
    PartDistillCheckpointer(model).load(weights)
    return model
