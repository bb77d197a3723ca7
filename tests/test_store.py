"""The mined-parts store: COCO readers, manifest merging, config stamps, and the loader's filters."""
import json
import os

import numpy as np
import pytest
from pycocotools.coco import COCO

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from part_distill.data.pseudo_labels import PseudoLabelFilters, load_pseudo_labels, register_pseudo_labels
from part_distill.mining.miner import records_to_shard
from part_distill.mining.object_sources import MinedObject
from part_distill.mining.store import ConfigMismatchError, PartStore, config_hash

H = W = 100  # image area 10000: the 1% object threshold is 100 pixels


def _rect(y0, y1, x0, x1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def _record(index, objects):
    """objects: list of (object mask, [part masks]) -> a miner record."""
    dd = {"file_name": f"img{index}.png", "height": H, "width": W, "image_id": 100 + index,
          "_mining_dataset": "toy"}
    objs = []
    for j, (om, pms) in enumerate(objects):
        parts = [(c, m) for c, m in enumerate(pms)] if pms else None
        objs.append([MinedObject(50 + j, 3, om, 1.0), parts, None if pms else "too_few_pixels"])
    return {"index": index, "dataset_dict": dd, "skip_reason": None, "objects": objs}


def _store(root):
    """Two shards: image 0 with three objects of known areas, image 1 skipped as unreadable."""
    small = _rect(0, 5, 0, 10)                                   # 50 px < 1% of the image
    b = _rect(20, 60, 0, 50)                                      # 2000 px
    b_parts = [_rect(20, 21, 0, 50), _rect(21, 41, 0, 50), _rect(41, 60, 0, 50)]  # 50, 1000, 950
    c = _rect(70, 80, 0, 100)                                     # 1000 px
    c_parts = [_rect(70, 76, 0, 100), _rect(76, 80, 0, 100)]       # 600 (> 50%), 400
    rec0 = _record(0, [(small, [_rect(0, 5, 0, 5), _rect(0, 5, 5, 10)]), (b, b_parts), (c, c_parts),
                       (_rect(90, 91, 0, 2), None)])
    rec1 = {"index": 1, "dataset_dict": {"file_name": "bad.png", "height": H, "width": W, "image_id": 7,
                                         "_mining_dataset": "toy"},
            "skip_reason": "unreadable_image: broken", "objects": []}
    run = {"config": {"MINING": {"NUM_CLUSTERS": 4}}, "inputs": {"datasets": [{"name": "toy", "num_images": 2}]}}
    run["config_hash"] = config_hash(run)
    store = PartStore(root)
    store.check_run(run)
    store.start_run(run)
    store.write_shard(0, records_to_shard([rec0], 0, run["config_hash"]))
    store.write_shard(1, records_to_shard([rec1], 1, run["config_hash"]))
    return store, run, [small, b, c], [b_parts, c_parts]


def test_shards_are_read_by_pycocotools_and_load_coco_json(tmp_path):
    store, run, objs, (b_parts, c_parts) = _store(tmp_path)
    path = store.shard_path(0)
    coco = COCO(path)
    assert coco.getCatIds() == [1] and coco.loadCats(1)[0]["name"] == "part"
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    assert len(anns) == 2 + 3 + 2
    with open(path) as f:
        shard = json.load(f)
    by_obj = {o["id"]: o for o in shard["objects"]}
    expected = {by_obj[a["object_id"]]["area"] for a in anns}
    assert expected == {50, 2000, 1000}
    b_id = [o["id"] for o in shard["objects"] if o["area"] == 2000][0]
    got = [coco.annToMask(a).astype(bool) for a in anns if a["object_id"] == b_id]
    assert all(np.array_equal(g, e) for g, e in zip(got, b_parts))
    # Object masks round-trip through the same RLE encoding.
    assert np.array_equal(coco.annToMask({"segmentation": by_obj[b_id]["segmentation"], "image_id": 1}), objs[1])

    dicts = load_coco_json(path, str(tmp_path), extra_annotation_keys=["object_id", "object_category_id"])
    assert len(dicts) == 1 and dicts[0]["image_id"] == 1 and len(dicts[0]["annotations"]) == 7
    assert {a["object_id"] for a in dicts[0]["annotations"]} == set(by_obj) - {
        o["id"] for o in shard["objects"] if o["skip_reason"]}
    assert all(a["object_category_id"] == 3 for a in dicts[0]["annotations"])
    # Ids are unique and derive from the image position only.
    assert len({a["id"] for a in shard["annotations"]}) == 7


def test_manifest_sums_shards_and_loader_filters(tmp_path):
    store, run, _, _ = _store(tmp_path)
    manifest = store.write_manifest(run, 2)
    assert manifest["counts"] == {"images": 1, "images_skipped": {"unreadable_image": 1}, "instances": 4,
                                  "instances_skipped": {"too_few_pixels": 1}, "parts": 7}
    assert [s["file"] for s in manifest["shards"]] == ["shards/shard_00000.json", "shards/shard_00001.json"]

    dicts = load_pseudo_labels(os.path.join(tmp_path, "manifest.json"))
    assert len(dicts) == 1
    areas = sorted(int(np.asarray(a["bbox"])[2] * a["bbox"][3]) for a in dicts[0]["annotations"])
    # small object: both parts dropped; b: 50 px part (2.5%) dropped, 1000 (= 50%) and 950 kept;
    # c: 600 px part (60%) dropped, 400 kept.
    assert areas == [400, 950, 1000]
    assert all(a["category_id"] == 0 for a in dicts[0]["annotations"])

    loose = load_pseudo_labels(str(tmp_path), PseudoLabelFilters(0.0, 0.0, 1.0))
    assert len(loose[0]["annotations"]) == 7

    name = "test_store_pseudo_labels"
    try:
        register_pseudo_labels(name, os.path.join(tmp_path, "manifest.json"), PseudoLabelFilters(0.0, 0.05, 0.5))
        got = DatasetCatalog.get(name)
        assert len(got[0]["annotations"]) == 5  # the small object's two 50% parts are back
        assert MetadataCatalog.get(name).thing_classes == ["part"]
    finally:
        DatasetCatalog.pop(name, None)
        MetadataCatalog.pop(name, None)


def test_missing_shard_and_mismatched_config_are_errors(tmp_path):
    store, run, _, _ = _store(tmp_path)
    with pytest.raises(RuntimeError, match=r"shards \[2\] are missing"):
        store.write_manifest(run, 3)
    other = dict(run, config={"MINING": {"NUM_CLUSTERS": 5}})
    other["config_hash"] = config_hash({k: other[k] for k in ("config", "inputs")})
    with pytest.raises(ConfigMismatchError, match="MINING"):
        store.check_run(other)
    store.check_run(other, overwrite=True)  # allowed: the caller will clear the store
    os.unlink(os.path.join(tmp_path, "run.json"))
    with pytest.raises(ConfigMismatchError, match="no run.json"):
        store.check_run(run)
    with pytest.raises(FileNotFoundError, match="mine_parts"):
        load_pseudo_labels(str(tmp_path))


def test_manifest_is_summed_from_shard_summaries_without_reading_shards(tmp_path, monkeypatch):
    store, run, _, _ = _store(tmp_path)
    assert sorted(os.listdir(tmp_path / "summaries")) == ["shard_00000.json", "shard_00001.json"]
    # Reference: the manifest of the shards themselves (summaries gone, as in a store of older code).
    other = tmp_path / "copy"
    import shutil

    shutil.copytree(tmp_path, other, ignore=shutil.ignore_patterns("summaries", "copy"))
    reference = PartStore(other).write_manifest(run, 2)

    def no_shard_reads(*a, **k):
        raise AssertionError("write_manifest read a shard")

    monkeypatch.setattr(PartStore, "read_shard", no_shard_reads)
    manifest = store.write_manifest(run, 2)
    assert {k: manifest[k] for k in ("counts", "shards")} == {k: reference[k] for k in ("counts", "shards")}
    assert manifest["counts"]["parts"] == 7 and manifest["shards"][0]["images"] == 1
