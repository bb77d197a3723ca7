"""build_part_evaluators wires every cfg.TEST.PARTS key into the evaluators (YAML path = kwargs path)."""
import numpy as np

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from part_distill.config import add_part_distill_config
from part_distill.evaluation import PartAREvaluator, PartMIoUEvaluator, PartNMIARIEvaluator, build_part_evaluators
from part_distill.evaluation.synthetic import synthetic_parts_dataset, synthetic_predictions


def _run(evaluator, dicts, outputs):
    evaluator.reset()
    for d, out in zip(dicts, outputs):
        evaluator.process([{"image_id": d["image_id"]}], [out])
    return evaluator.evaluate()


def test_cfg_and_kwargs_give_the_same_metrics(tmp_path):
    dicts, meta = synthetic_parts_dataset(10, 24, 24, seed=4)
    name = "_test_eval_build_parts"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: dicts)
        MetadataCatalog.get(name).set(**meta)
    outputs = [synthetic_predictions(d, 8, seed=i) for i, d in enumerate(dicts)]
    cfg = add_part_distill_config(get_cfg())
    cfg.merge_from_list(["TEST.PARTS.AR_KS", [2, 7], "TEST.PARTS.AR_MODES", ["non_overlap"],
                         "TEST.PARTS.RESTRICT_TO_GT_OBJECT", ["assigned"],
                         "TEST.PARTS.OBJECT_ASSIGNMENT", "object_index", "TEST.PARTS.UNLABELED_GT", "label",
                         "TEST.PARTS.ASSOCIATION", "hungarian", "TEST.PARTS.MATCH_SPLIT_FRACTION", 0.3,
                         "TEST.PARTS.MATCH_SPLIT_SEED", 3])
    from_cfg = _run(build_part_evaluators(cfg, name, output_dir=str(tmp_path)), dicts, outputs)
    common = dict(dataset_dicts=dicts, metadata=meta, distributed=False)
    expected = {}
    for ev in (PartAREvaluator(ks=[2, 7], modes=["non_overlap"], restrictions=["assigned"],
                               object_assignment="object_index", **common),
               PartMIoUEvaluator(association="hungarian", match_fraction=0.3, match_seed=3,
                                 object_assignment="object_index", unlabeled_gt="label", **common),
               PartNMIARIEvaluator(object_assignment="object_index", unlabeled_gt="label", **common)):
        expected.update(_run(ev, dicts, outputs))
    assert set(from_cfg) == {"parts_ar", "parts_miou", "parts_nmi_ari"}
    assert "AR@7-nonoverlap-gtobj_assigned" in from_cfg["parts_ar"]
    for task, metrics in expected.items():
        assert from_cfg[task].keys() == metrics.keys()
        for k, v in metrics.items():
            assert np.isclose(from_cfg[task][k], v, atol=0, rtol=0, equal_nan=True), (task, k)
    assert (tmp_path / "parts_miou.csv").exists() and (tmp_path / "parts_association.json").exists()
