"""Two CPU processes (gloo) split the images unevenly and must give the metrics of one process."""
import json
import multiprocessing
import os

import numpy as np
import pytest
from _gloo import gloo_group

NUM_IMAGES = 14


def _data():
    from part_distill.evaluation.synthetic import synthetic_parts_dataset, synthetic_predictions

    dicts, meta = synthetic_parts_dataset(NUM_IMAGES, 24, 28, seed=11)
    outputs = [synthetic_predictions(d, 3 + i % 9, score_levels=4, seed=i) for i, d in enumerate(dicts)]
    return dicts, meta, outputs


def _metrics(indices, distributed, out_dir):
    from detectron2.evaluation import DatasetEvaluators

    from part_distill.evaluation import PartAREvaluator, PartMIoUEvaluator, PartNMIARIEvaluator

    dicts, meta, outputs = _data()
    common = dict(dataset_dicts=dicts, metadata=meta, distributed=distributed, output_dir=out_dir)
    ev = DatasetEvaluators([
        PartAREvaluator(ks=[1, 5, 20], modes=["overlap", "non_overlap"], restrictions=["none", "assigned"], **common),
        PartMIoUEvaluator(match_fraction=0.4, **common),
        PartNMIARIEvaluator(**common),
    ])
    ev.reset()
    for i in indices:
        ev.process([{"image_id": dicts[i]["image_id"]}], [outputs[i]])
    return ev.evaluate()


def _worker(rank, init_file, out_dir):
    with gloo_group(rank, init_file):
        # Uneven shards: rank 0 gets a third of the images, rank 1 the rest.
        indices = [i for i in range(NUM_IMAGES) if (i % 3 == 0) == (rank == 0)]
        res = _metrics(indices, True, os.path.join(out_dir, "reports"))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)


def test_two_gloo_processes_equal_one_process(tmp_path):
    single = json.loads(json.dumps(_metrics(range(NUM_IMAGES), False, str(tmp_path / "single_reports"))))
    ctx = multiprocessing.get_context("spawn")  # no fork: the parent may hold torch/OpenMP threads
    procs = [ctx.Process(target=_worker, args=(r, str(tmp_path / "pg_init"), str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    for p in procs:
        if p.is_alive():
            p.terminate()
            pytest.fail("a gloo worker hung")
        assert p.exitcode == 0
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank1 == {}  # only the main process returns metrics
    assert rank0.keys() == single.keys()
    for task in single:
        assert rank0[task].keys() == single[task].keys()
        for name, value in single[task].items():
            assert np.isclose(rank0[task][name], value, rtol=0, atol=1e-12, equal_nan=True), (task, name)
    assert single["parts_ar"]["AR@20"] > 0 and single["parts_miou"]["separate_split"] == 1.0
    # rank 0 writes the reports one process writes, byte for byte
    names = sorted(os.listdir(tmp_path / "single_reports"))
    assert {"parts_ar.csv", "parts_miou.csv", "parts_nmi_ari.md"} <= set(names)
    assert sorted(os.listdir(tmp_path / "reports")) == names
    for name in names:
        assert (tmp_path / "reports" / name).read_bytes() == (tmp_path / "single_reports" / name).read_bytes(), name
