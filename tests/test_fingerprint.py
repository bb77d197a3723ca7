"""Worlds keyed by their settings and dataset fingerprints: coexisting worlds, concurrent generation,
stores / checkpoints refusing other data with a message that names both fingerprints."""
import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import re

import pytest
import torch

import part_distill  # noqa: F401  (registers datasets and models)
from detectron2.data import DatasetCatalog, MetadataCatalog
from part_distill.data import fingerprint as fpmod
from part_distill.data import parts_world as pw
from part_distill.data.fingerprint import (FingerprintMismatchError, check_store_sources, dataset_fingerprint,
                                           source_fingerprints)
from part_distill.engine.self_training import build_teacher
from part_distill.engine.setup import build_cfg
from part_distill.evaluation.store_predictions import evaluate_store
from part_distill.mining.miner import mine_parts

from _tiny_part_model import tiny_part_cfg
from conftest import parts_world_at
from _kill_harness import tree_bytes

SEED0 = pw.WorldSettings(seed=0, num_train=2, num_val=3, image_size=64, max_objects=2)
SEED3 = dataclasses.replace(SEED0, seed=3)


def _mine(out, dataset="parts_world_val", *opts):
    return mine_parts(build_cfg("", [
        "MODEL.DEVICE", "cpu", "MINING.FEATURES", "rgbxy", "MINING.IMAGE_SIZE", "64", "MINING.MAX_ITER", "20",
        "MINING.DATASETS", f'("{dataset}",)', "MINING.OUTPUT_DIR", str(out), *opts]))


def _ar(store, out):
    cfg = build_cfg("", ["TEST.PARTS.EVALUATORS", "['PartAREvaluator']"])
    return evaluate_store(cfg, str(store), "parts_world_val_parts", str(out))["parts_ar"]


def _fp(settings, split="val"):
    return f"world:{settings.key}/{split}"


def test_two_worlds_coexist_and_each_evaluates_its_own_store(tmp_path):
    ds = tmp_path / "ds"
    with parts_world_at(ds, SEED0):
        m0 = _mine(tmp_path / "store0")
        ar0 = _ar(tmp_path / "store0", tmp_path / "eval0")
    world0 = ds / "parts_world" / SEED0.key
    before = tree_bytes(world0)
    assert m0["inputs"]["datasets"][0]["fingerprint"] == _fp(SEED0)
    with parts_world_at(ds, SEED3):
        _mine(tmp_path / "store3")
        ar3 = _ar(tmp_path / "store3", tmp_path / "eval3")
        # the seed-0 store against the seed-3 world: refused, both fingerprints named
        with pytest.raises(FingerprintMismatchError, match=re.escape(_fp(SEED0)) + ".*" + re.escape(_fp(SEED3))):
            _ar(tmp_path / "store0", tmp_path / "eval_wrong")
    assert sorted(n for n in os.listdir(ds / "parts_world") if not n.startswith(".")) == sorted([SEED0.key, SEED3.key])
    assert tree_bytes(world0) == before  # making seed 3 rewrote nothing of seed 0
    with parts_world_at(ds, SEED0):
        assert _ar(tmp_path / "store0", tmp_path / "eval0_again") == ar0
    assert ar0 != ar3  # different images: the check above is not comparing a world with itself
    assert (ds / "parts_world" / SEED3.key / "world.json").is_file()


def _generate(base, settings, barrier, use_lock, queue):
    """One racing process: counts its own generations; optionally without the lock (rename race only)."""
    calls = []
    real = pw.generate_parts_world
    pw.generate_parts_world = lambda root, s: calls.append(root) or real(root, s)
    if not use_lock:
        pw._exclusive_lock = lambda path: contextlib.nullcontext()
    barrier.wait()
    queue.put((pw.ensure_parts_world(base, settings), len(calls)))


@pytest.mark.parametrize("use_lock", [True, False], ids=["lock", "rename_race"])
def test_concurrent_processes_make_one_complete_world(tmp_path, use_lock):
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    base = str(tmp_path / "parts_world")
    procs = [ctx.Process(target=_generate, args=(base, SEED0, barrier, use_lock, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    roots, generations = zip(*results)
    assert set(roots) == {os.path.join(base, SEED0.key)}
    if use_lock:
        assert sum(generations) == 1  # the second process waited and reused the first one's world
    assert pw.world_status(roots[0], SEED0) is None
    assert [n for n in os.listdir(base) if not n.endswith(".lock")] == [SEED0.key]  # no temp folders left
    # byte-identical to a world generated alone
    alone = tmp_path / "alone"
    alone.mkdir()
    pw.generate_parts_world(str(alone), SEED0)
    assert tree_bytes(roots[0]) == tree_bytes(alone)


@pytest.fixture
def annotated_dataset(tmp_path):
    """A registered dataset fingerprinted by its annotation file (as the real datasets are)."""
    ann = tmp_path / "anns" / "instances.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps({"images": [1, 2]}))
    name = "fingerprint_test_real"
    DatasetCatalog.register(name, lambda: [])
    fpmod.register_fingerprint_sources(name, lambda: [str(ann.parent)])
    yield name, ann
    DatasetCatalog.pop(name, None)
    MetadataCatalog.pop(name, None)
    fpmod._SOURCES.pop(name, None)


def test_file_fingerprints_follow_content_and_are_cached(annotated_dataset, monkeypatch):
    name, ann = annotated_dataset
    hashed = []
    real = fpmod.file_sha256
    monkeypatch.setattr(fpmod, "file_sha256", lambda p: hashed.append(p) or real(p))
    first = dataset_fingerprint(name)
    assert first.startswith("files:") and len(hashed) == 1
    assert dataset_fingerprint(name) == first and len(hashed) == 1  # same path, size, mtime: cached
    ann.write_text(json.dumps({"images": [1, 3]}))  # same size, other bytes
    os.utime(ann, ns=(1, 1))
    changed = dataset_fingerprint(name)
    assert changed != first and len(hashed) == 2
    ann.write_text(json.dumps({"images": [1, 2]}))  # content back: the fingerprint is back too
    assert dataset_fingerprint(name) == first
    with open(fpmod._cache_path()) as f:  # and the hashes persist for the next process
        assert any(k.startswith(str(ann)) for k in json.load(f))


def test_evaluating_a_store_of_changed_annotations_names_both_fingerprints(annotated_dataset, tmp_path):
    name, ann = annotated_dataset
    old = dataset_fingerprint(name)
    store = tmp_path / "store"
    store.mkdir()
    manifest = {"config_hash": "0" * 16, "shards": [], "counts": {},
                "inputs": {"datasets": [{"name": name, "num_images": 0, "fingerprint": old}]}}
    (store / "manifest.json").write_text(json.dumps(manifest))
    cfg = build_cfg("", ["TEST.PARTS.EVALUATORS", "['PartAREvaluator']"])
    ann.write_text(json.dumps({"images": [1, 2, 3]}))
    new = dataset_fingerprint(name)
    with pytest.raises(FingerprintMismatchError) as err:
        evaluate_store(cfg, str(store), name, str(tmp_path / "eval"))
    assert old in str(err.value) and new in str(err.value) and str(store) in str(err.value)


def test_mining_resume_against_another_world_refuses(tmp_path):
    ds = tmp_path / "ds"
    with parts_world_at(ds, SEED0):
        _mine(tmp_path / "store")
    with parts_world_at(ds, SEED3):
        with pytest.raises(FingerprintMismatchError, match=re.escape(_fp(SEED0)) + ".*" + re.escape(_fp(SEED3))):
            _mine(tmp_path / "store")


def _trainer(out):
    from part_distill.engine.trainer import PartDistillTrainer

    return PartDistillTrainer(tiny_part_cfg("DATASETS.TRAIN", '("parts_world_train",)', "DATASETS.TEST", "()",
                                            "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "1",
                                            "OUTPUT_DIR", str(out)))


def test_checkpoints_record_their_data_and_resume_refuses_other_data(tmp_path):
    ds, out = tmp_path / "ds", tmp_path / "run"
    with parts_world_at(ds, SEED0):
        trainer = _trainer(out)
        trainer.checkpointer.save("model_0000000", iteration=0)
        saved = torch.load(out / "model_0000000.pth", weights_only=False)["data_fingerprints"]
        assert saved["datasets"] == {"parts_world_train": _fp(SEED0, "train")}
        _trainer(out).resume_or_load(resume=True)  # same data: resumes
    with parts_world_at(ds, SEED3):
        with pytest.raises(FingerprintMismatchError,
                           match=re.escape(_fp(SEED0, "train")) + ".*" + re.escape(_fp(SEED3, "train"))):
            _trainer(out).resume_or_load(resume=True)
        _trainer(tmp_path / "fresh").resume_or_load(resume=True)  # nothing to resume: nothing to refuse
        # the checkpoint as the teacher of data it was not trained on (self-training, ranking, stage 4)
        cfg = tiny_part_cfg()
        with pytest.raises(FingerprintMismatchError, match=re.escape(_fp(SEED3, "train"))):
            build_teacher(cfg, str(out / "model_0000000.pth"), source_fingerprints(["parts_world_train"]))
    with parts_world_at(ds, SEED0):
        build_teacher(cfg, str(out / "model_0000000.pth"), source_fingerprints(["parts_world_train"]))


def test_next_stage_refuses_a_store_of_another_world(tmp_path):
    manifest = {"inputs": {"datasets": [{"name": "parts_world_train", "num_images": 2,
                                         "fingerprint": _fp(SEED0, "train")}]}}
    with parts_world_at(tmp_path, SEED0):
        check_store_sources(manifest, "store0")
    with parts_world_at(tmp_path, SEED3):
        with pytest.raises(FingerprintMismatchError, match=re.escape(_fp(SEED0, "train")) + ".*"
                           + re.escape(_fp(SEED3, "train"))):
            check_store_sources(manifest, "store0")
        # a store from before fingerprints: accepted (with a warning), not refused
        check_store_sources({"inputs": {"datasets": [{"name": "parts_world_train", "num_images": 2}]}}, "old")
