"""Registry of part evaluators and the builder that reads ``cfg.TEST.PARTS.EVALUATORS``."""
from detectron2.evaluation import DatasetEvaluators
from detectron2.utils.registry import Registry

PARTS_EVALUATOR_REGISTRY = Registry("PARTS_EVALUATOR")
PARTS_EVALUATOR_REGISTRY.__doc__ = """
Part segmentation evaluators; each is called as ``Evaluator(cfg, dataset_name, output_dir=...)``
and returns a detectron2 ``DatasetEvaluator``.
"""


def build_part_evaluators(cfg, dataset_name, output_dir=None):
    """All evaluators named in ``cfg.TEST.PARTS.EVALUATORS`` for one ``*_parts`` dataset."""
    return DatasetEvaluators([
        PARTS_EVALUATOR_REGISTRY.get(name)(cfg, dataset_name, output_dir=output_dir)
        for name in cfg.TEST.PARTS.EVALUATORS
    ])
