"""build_part_evaluators wires every cfg.TEST.PARTS key into the evaluators (YAML path = kwargs path),
and each key it wires changes the metrics, so a key dropped on the way would be seen."""
import numpy as np
import pytest

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from part_distill.config import add_part_distill_config
from part_distill.evaluation import PartAREvaluator, PartMIoUEvaluator, PartNMIARIEvaluator, build_part_evaluators
from part_distill.evaluation.synthetic import synthetic_parts_dataset, synthetic_predictions

# cfg key -> (evaluator kwarg, non-default value, evaluators that read it)
SETTINGS = {
    "AR_KS": ("ks", [2, 7], ("ar",)),
    "AR_MODES": ("modes", ["non_overlap"], ("ar",)),
    "RESTRICT_TO_GT_OBJECT": ("restrictions", ["assigned"], ("ar",)),
    "OBJECT_ASSIGNMENT": ("object_assignment", "object_index", ("ar", "miou", "nmi")),
    "UNLABELED_GT": ("unlabeled_gt", "label", ("miou", "nmi")),
    "ASSOCIATION": ("association", "hungarian", ("miou",)),
    "MATCH_SPLIT_FRACTION": ("match_fraction", 0.3, ("miou",)),
    "MATCH_SPLIT_SEED": ("match_seed", 3, ("miou",)),
}
EVALUATORS = {"ar": PartAREvaluator, "miou": PartMIoUEvaluator, "nmi": PartNMIARIEvaluator}
TASKS = {"ar": "parts_ar", "miou": "parts_miou", "nmi": "parts_nmi_ari"}


def _run(evaluator, dicts, outputs):
    evaluator.reset()
    for d, out in zip(dicts, outputs):
        evaluator.process([{"image_id": d["image_id"]}], [out])
    return evaluator.evaluate()


def _same(a, b):
    return a.keys() == b.keys() and all(np.isclose(a[k], v, atol=0, rtol=0, equal_nan=True) for k, v in b.items())


@pytest.fixture(scope="module")
def data():
    dicts, meta = synthetic_parts_dataset(10, 24, 24, seed=6)  # a seed where every key below matters
    name = "_test_eval_build_parts"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: dicts)
        MetadataCatalog.get(name).set(**meta)
    outputs = [synthetic_predictions(d, 8, seed=i) for i, d in enumerate(dicts)]
    return name, dicts, meta, outputs


def _from_kwargs(data, key, **kwargs):
    """The metrics of evaluator ``key`` built directly with SETTINGS' values, overridden by kwargs."""
    _, dicts, meta, outputs = data
    mine = {arg: value for arg, value, users in SETTINGS.values() if key in users}
    mine.update(kwargs)
    [(task, metrics)] = _run(EVALUATORS[key](dataset_dicts=dicts, metadata=meta, distributed=False, **mine),
                             dicts, outputs).items()
    assert task == TASKS[key]
    return metrics


def test_cfg_and_kwargs_give_the_same_metrics(tmp_path, data):
    name, dicts, _, outputs = data
    cfg = add_part_distill_config(get_cfg())
    cfg.merge_from_list([x for key, (_, value, _) in SETTINGS.items() for x in (f"TEST.PARTS.{key}", value)])
    built = build_part_evaluators(cfg, name, output_dir=str(tmp_path))
    assert [type(e) for e in built._evaluators] == [PartAREvaluator, PartMIoUEvaluator, PartNMIARIEvaluator]
    from_cfg = _run(built, dicts, outputs)
    assert set(from_cfg) == {"parts_ar", "parts_miou", "parts_nmi_ari"}
    assert sorted(k for k in from_cfg["parts_ar"] if k.startswith("AR@")) == [
        "AR@2-nonoverlap-gtobj_assigned", "AR@7-nonoverlap-gtobj_assigned"]
    for key, task in TASKS.items():
        assert _same(from_cfg[task], _from_kwargs(data, key)), task
    # Each key matters to each evaluator that reads it: with that one key back at its default the
    # evaluator's metrics differ, so a from_config that dropped it could not produce from_cfg.
    defaults = add_part_distill_config(get_cfg()).TEST.PARTS
    for name, (arg, _, users) in SETTINGS.items():
        for key in users:
            assert not _same(from_cfg[TASKS[key]], _from_kwargs(data, key, **{arg: defaults[name]})), (name, key)
    assert (tmp_path / "parts_miou.csv").exists() and (tmp_path / "parts_association.json").exists()
