"""A part store evaluated as predictions: GT parts with consistent ids score perfectly, scrambled ids do not."""
import numpy as np
import pytest

from part_distill.data.datasets.parts_world import register_parts_world
from part_distill.data.parts_world import WorldSettings
from part_distill.engine.setup import build_cfg
from part_distill.evaluation.store_predictions import evaluate_store
from part_distill.mining.miner import records_to_shard
from part_distill.mining.object_sources import MinedObject
from part_distill.mining.store import PartStore
from part_distill.utils.masks import decode_rle

from detectron2.data import DatasetCatalog


@pytest.fixture()
def tiny_world(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "ds"))
    register_parts_world(WorldSettings(num_train=2, num_val=6, image_size=96))
    yield DatasetCatalog.get("parts_world_val_parts")
    register_parts_world()


def _write_store(root, dicts, scramble_seed=None):
    rng = np.random.default_rng(scramble_seed)
    records = []
    for index, dd in enumerate(dicts):
        objects = []
        for ann in dd["annotations"]:
            obj = MinedObject(ann["id"], ann["category_id"], decode_rle(ann["segmentation"]), 1.0)
            cats = [p["category_id"] for p in ann["parts"]]
            if scramble_seed is not None:  # per-instance arbitrary ids, like raw k-means output
                cats = list(rng.permutation(len(cats)))
            objects.append((obj, [(int(c), decode_rle(p["segmentation"])) for c, p in zip(cats, ann["parts"])], None))
        records.append({"dataset_dict": dict(dd, _mining_dataset="parts_world_val"), "index": index,
                        "skip_reason": None, "objects": objects})
    run_info = {"config_hash": "test", "config": {}}
    store = PartStore(str(root))
    store.start_run(run_info)
    store.write_shard(0, records_to_shard(records, 0, "test"))
    store.write_manifest(run_info, 1)
    return str(root)


def test_gt_parts_store_scores_perfectly(tiny_world, tmp_path):
    cfg = build_cfg(opts=["TEST.PARTS.MATCH_SPLIT_FRACTION", "0.5"])
    store = _write_store(tmp_path / "store", tiny_world)
    res = evaluate_store(cfg, store, "parts_world_val_parts", str(tmp_path / "eval"))
    ar = res["parts_ar"]
    assert max(v for k, v in ar.items() if k.startswith("AR@200")) == pytest.approx(100.0)
    assert res["parts_nmi_ari"]["NMI"] == pytest.approx(100.0)
    assert res["parts_nmi_ari"]["ARI"] == pytest.approx(100.0)


def test_scrambled_cluster_ids_lower_nmi_not_ar(tiny_world, tmp_path):
    cfg = build_cfg()
    good = evaluate_store(cfg, _write_store(tmp_path / "a", tiny_world), "parts_world_val_parts", str(tmp_path / "ea"))
    bad = evaluate_store(cfg, _write_store(tmp_path / "b", tiny_world, scramble_seed=0),
                         "parts_world_val_parts", str(tmp_path / "eb"))
    assert bad["parts_nmi_ari"]["NMI"] < good["parts_nmi_ari"]["NMI"] - 5
    assert {k: v for k, v in bad["parts_ar"].items()} == pytest.approx(dict(good["parts_ar"]))
