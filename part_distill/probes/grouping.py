"""Pixel-grouping probe (PartDistillation Table 5): AR@1 / AR@10 of k-means parts inside GT objects.

Not a re-implementation: the miner (``cfg.MINING.*`` picks features, metric, k, level, CRF) mines
the GT objects of the scored split into a store, and ``evaluate_store`` scores that store with
``PartAREvaluator`` (class-agnostic, IoU .50:.95, masks as mined, no restriction). So the numbers
are exactly those of ``tools/mine_parts.py`` + ``tools/evaluate_parts.py`` on the same images.
"""
import logging

from ..evaluation.store_predictions import evaluate_store
from ..mining.miner import mine_parts

__all__ = ["grouping_cfg", "run_grouping_probe"]

logger = logging.getLogger(__name__)

KS = (1, 10)


def grouping_cfg(cfg, dataset_name, store_dir):
    """``cfg`` with mining pointed at the GT objects of ``dataset_name`` and AR@1/AR@10 as the only metric."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MINING.DATASETS = (dataset_name,)
    cfg.MINING.OBJECT_SOURCE = "gt"
    cfg.MINING.OUTPUT_DIR = store_dir
    cfg.TEST.PARTS.EVALUATORS = ["PartAREvaluator"]
    cfg.TEST.PARTS.AR_KS = list(KS)
    cfg.TEST.PARTS.AR_MODES = ["overlap"]
    cfg.TEST.PARTS.RESTRICT_TO_GT_OBJECT = ["none"]
    cfg.freeze()
    return cfg


def run_grouping_probe(cfg, dataset_name, store_dir, eval_dir=None):
    """Mine ``dataset_name`` into ``store_dir`` (overwriting a store mined differently) and score it.

    Returns ``{"AR@1", "AR@10", "num_gt_parts", "instances", "instances_skipped", "images_skipped"}``.
    """
    gcfg = grouping_cfg(cfg, dataset_name, store_dir)
    manifest = mine_parts(gcfg, overwrite=True)
    ar = evaluate_store(gcfg, store_dir, dataset_name, eval_dir)["parts_ar"]
    counts = manifest["counts"]
    return {"AR@1": ar["AR@1"], "AR@10": ar["AR@10"], "num_gt_parts": int(ar["num_gt_parts"]),
            "instances": counts["instances"], "instances_skipped": counts["instances_skipped"],
            "images_skipped": counts["images_skipped"]}
