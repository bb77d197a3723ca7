"""Timing of the three part evaluators on parts-world-sized synthetic data (tools/benchmark_evaluators.py)."""
import time

from ..evaluation.average_recall import PartAREvaluator
from ..evaluation.miou import PartMIoUEvaluator
from ..evaluation.nmi_ari import PartNMIARIEvaluator
from ..evaluation.synthetic import synthetic_parts_dataset, synthetic_predictions


def benchmark_evaluators(num_images=500, size=192, num_proposals=200, seed=0, output_dir=None):
    """Wall and CPU seconds inside each evaluator's process()+evaluate() (prediction synthesis not
    counted). CPU time is what one core costs even when other jobs share the machine.

    GT resembles the parts world (1-4 objects of 3-6 parts); predictions are generated per image on
    the fly so dense masks of only one image are ever alive, as in a real inference loop."""
    dicts, meta = synthetic_parts_dataset(num_images, size, size, num_object_classes=7, parts_per_class=6,
                                          max_objects=4, unlabeled_prob=0.0, empty_image_prob=0.0, seed=seed)
    common = dict(dataset_dicts=dicts, metadata=meta, distributed=False, output_dir=output_dir)
    evaluators = {
        "ar": PartAREvaluator(ks=(1, 10, 50, 100, 200), modes=("overlap", "non_overlap"),
                              restrictions=("none", "union"), **common),
        "miou": PartMIoUEvaluator(**common),
        "nmi_ari": PartNMIARIEvaluator(**common),
    }
    wall, cpu = dict.fromkeys(evaluators, 0.0), dict.fromkeys(evaluators, 0.0)
    for ev in evaluators.values():
        ev.reset()
    for i, d in enumerate(dicts):
        out = synthetic_predictions(d, num_proposals, num_clusters=8, seed=seed * 1_000_003 + i)
        for name, ev in evaluators.items():
            t, c = time.perf_counter(), time.process_time()
            ev.process([{"image_id": d["image_id"]}], [out])
            wall[name] += time.perf_counter() - t
            cpu[name] += time.process_time() - c
    results = {}
    for name, ev in evaluators.items():
        t, c = time.perf_counter(), time.process_time()
        results.update(ev.evaluate())
        wall[name] += time.perf_counter() - t
        cpu[name] += time.process_time() - c
    return wall, cpu, results
