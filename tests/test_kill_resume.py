"""Kill anywhere, rerun, get the uninterrupted outputs: mining, self-training labelling and training.

Each job runs in a forked child that is SIGKILLed at random points drawn from the writes of an
uninterrupted run (after a write, or inside it at a random byte offset) or after a random delay; a
fresh child then reruns it to completion. The rerun must leave no temp file and produce:

* mining: the uninterrupted store, byte for byte;
* self-training labels: the uninterrupted label store, byte for byte;
* self-training student training: a resume from the newest intact checkpoint on disk at the kill
  (the iteration counter is that checkpoint's + 1, and the weights at the first resumed step are
  that checkpoint's), and a finished round (model_final at iteration MAX_ITER - 1, round.json) whose
  final and EMA weights equal the uninterrupted run's bit for bit (one process, NUM_WORKERS 0, SEED
  fixed: engine/resume_state.py restores the sample-stream position and the RNGs).

Damaged files (a shard or a checkpoint cut short) are named in a warning or error and re-made.
"""
import json
import logging
import os
import random

import pytest
import torch

import part_distill  # noqa: F401  (registers datasets and models)
from _tiny_part_model import tiny_world_part_opts
from _kill_harness import (KILLED, draw_kill_points, elapsed, leftover_temps, run_in_child, state_digest,
                           trace_writes, tree_bytes)
from part_distill.data.parts_world import WorldSettings
from part_distill.engine.self_training import _label_round, run_rounds
from part_distill.engine.setup import build_cfg
from part_distill.engine.trainer import PartDistillTrainer
from part_distill.mining.miner import mine_parts
from part_distill.mining.store import PartStore
from part_distill.modeling.checkpoint import PartDistillCheckpointer
from part_distill.utils.io import DamagedFileError

SETTINGS = WorldSettings(seed=3, num_train=6, num_val=1, image_size=64, max_objects=2)
NUM_KILLS = 5
ITERS = 4


# ---------------------------------------------------------------- jobs (run in forked children)
def mining_cfg(out):
    return build_cfg("", [
        "MODEL.DEVICE", "cpu", "MINING.FEATURES", "rgbxy", "MINING.IMAGE_SIZE", "64", "MINING.SHARD_SIZE", "1",
        "MINING.BATCH_SIZE", "1", "MINING.MAX_ITER", "20", "MINING.DATASETS", '("parts_world_train",)',
        "MINING.OUTPUT_DIR", str(out)])


def mining_job(out):
    mine_parts(mining_cfg(out))


def self_train_cfg(out, weights):
    return build_cfg("", tiny_world_part_opts(out, weights) + [
        "SOLVER.BASE_LR", "0.0001", "SOLVER.CHECKPOINT_PERIOD", "1",
        "PART_DISTILL.SELF_TRAIN.ITERS_PER_ROUND", str(ITERS), "PART_DISTILL.SELF_TRAIN.TEACHER", "ema",
        "PART_DISTILL.FIT.NUM_IMAGES", "0"])


def record_resumes(path):
    """In a job's child only: every PartDistillTrainer.resume_or_load appends its outcome to ``path``
    (start iteration, checkpoint loaded, digest of the weights it left in the model)."""
    original = PartDistillTrainer.resume_or_load

    def recording(self, resume=True):
        original(self, resume=resume)
        with open(path, "a") as f:
            f.write(json.dumps({"start_iter": self.start_iter, "resumed_from": self.checkpointer.resumed_from,
                                "weights": state_digest(self.checkpointer.model.state_dict())}) + "\n")

    PartDistillTrainer.resume_or_load = recording


def label_job(out, weights):
    """Self-training labelling alone: the teacher's label store of round 0 (what run_rounds makes first)."""
    cfg = self_train_cfg(out, weights)
    _label_round(cfg, cfg, weights, os.path.join(out, "labels"), "self_train", 0, None)


def self_train_job(out, weights):
    record_resumes(os.path.join(out, "starts.jsonl"))
    run_rounds(self_train_cfg(out, weights), stage="self_train", num_rounds=1)


def supervised_cfg(out):
    # Identity augmentation, as in test_supervised.py; no evaluation.
    return build_cfg("", [
        "PART_DISTILL.STAGE", "supervised", "MODEL.DEVICE", "cpu", "MODEL.META_ARCHITECTURE", "SupervisedPartModel",
        "MODEL.WEIGHTS", "", "MODEL.BACKBONE.NAME", "build_efficientnet_lite_backbone",
        "MODEL.EFFICIENTNET.PRETRAINED", "False", "MODEL.BACKBONE.FREEZE_AT", "0",
        "MODEL.PIXEL_MEAN", "[127.5, 127.5, 127.5]", "MODEL.PIXEL_STD", "[127.5, 127.5, 127.5]",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "7", "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "FPNPixelDecoder",
        "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32", "MODEL.SEM_SEG_HEAD.NORM", "GN",
        "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.NHEADS", "2",
        "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64", "MODEL.MASK_FORMER.DEC_LAYERS", "2",
        "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "4", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "64",
        "MODEL.PART_DISTILL.NUM_PART_QUERIES", "6", "MODEL.PART_DISTILL.NUM_PART_CLASSES", "14",
        "MODEL.PART_DISTILL.OBJECTS", "gt", "INPUT.FORMAT", "RGB", "INPUT.IMAGE_SIZE", "64",
        "INPUT.MIN_SCALE", "1.0", "INPUT.MAX_SCALE", "1.0", "INPUT.RANDOM_FLIP", "none",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "INPUT.DATASET_MAPPER_NAME", "PartTargetLSJMapper",
        "INPUT.PART_CLASS_KEY", "category_id", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", str(ITERS), "SOLVER.CHECKPOINT_PERIOD", "1", "SOLVER.STEPS", "()",
        "SOLVER.WARMUP_ITERS", "0", "TEST.EVAL_PERIOD", "0", "DATASETS.TRAIN", '("parts_world_train_parts",)',
        "DATASETS.TEST", "()", "SEED", "0", "OUTPUT_DIR", str(out)])


def supervised_job(out):
    from part_distill.engine.supervised import run_supervised

    record_resumes(os.path.join(out, "starts.jsonl"))
    run_supervised(supervised_cfg(out), resume=True)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tiny_world_factory, tmp_path_factory):
    from detectron2.data import DatasetCatalog

    tiny_world_factory(SETTINGS)
    DatasetCatalog.get("parts_world_train")  # generated here, so the killed jobs only read it
    return {"tmp": tmp_path_factory.mktemp("kill")}


@pytest.fixture(scope="module")
def teacher(world):
    torch.manual_seed(0)
    model = PartDistillTrainer.build_model(self_train_cfg(world["tmp"] / "init", ""))
    weights = world["tmp"] / "teacher.pth"
    torch.save({"model": model.state_dict()}, weights)
    world["weights"] = str(weights)
    return str(weights)


@pytest.fixture(scope="module")
def mined(world):
    ref = world["tmp"] / "mined_ref"
    (writes, seconds) = elapsed(trace_writes, mining_job, str(ref), trace_file=world["tmp"] / "mining.trace")
    return {"dir": ref, "writes": writes, "seconds": seconds}


@pytest.fixture(scope="module")
def labelled(world, teacher):
    ref = world["tmp"] / "label_ref"
    writes = trace_writes(label_job, str(ref), teacher, trace_file=world["tmp"] / "label.trace")
    return {"dir": ref, "writes": writes}


@pytest.fixture(scope="module")
def self_trained(world, teacher):
    ref = world["tmp"] / "st_ref"
    writes = trace_writes(self_train_job, str(ref), world["weights"], trace_file=world["tmp"] / "st.trace")
    return {"dir": ref, "writes": writes}


def _kill_then_finish(job, out, *args, kill_at=None, kill_after_s=None, ckpt_sub="round_0"):
    code = run_in_child(job, str(out), *args, kill_at=kill_at, kill_after_s=kill_after_s)
    if kill_at is not None:
        assert code == KILLED, f"{job.__name__} was not killed at write {kill_at} (exit {code})"
    else:
        assert code in (KILLED, 0), f"{job.__name__} failed (exit {code}) before the kill"
    killed_state = _intact_checkpoints(out, ckpt_sub)
    assert run_in_child(job, str(out), *args) == 0, f"the rerun of {job.__name__} after the kill failed"
    assert leftover_temps(out) == []
    return killed_state


# ---------------------------------------------------------------- mining
def _store_writes(prefix, num_shards):
    """A store's writes in order: run.json, each shard then its summary (what the manifest sums),
    the manifest last."""
    per_shard = [f"{d}/shard_{c:05d}.json" for c in range(num_shards) for d in ("shards", "summaries")]
    return [os.path.join(prefix, n) for n in ["run.json"] + per_shard + ["manifest.json"]]


def test_mining_writes_are_traced(mined):
    names = [os.path.relpath(p, mined["dir"]) for p in mined["writes"]]
    assert names == _store_writes("", SETTINGS.num_train)


@pytest.mark.parametrize("seed", [0, 1])
def test_mining_killed_anywhere_resumes_byte_identical(world, mined, seed):
    points = draw_kill_points(mined["writes"], NUM_KILLS // 2 + seed, seed)
    for point in points:
        out = world["tmp"] / f"mine_{seed}_{point.replace('@', '_')}"
        _kill_then_finish(mining_job, out, kill_at=point)
        assert tree_bytes(out) == tree_bytes(mined["dir"]), f"kill at write {point}"


def test_mining_killed_after_random_delay_resumes_byte_identical(world, mined):
    rng = random.Random(7)
    for i in range(2):
        out = world["tmp"] / f"mine_delay_{i}"
        _kill_then_finish(mining_job, out, kill_after_s=rng.uniform(0.1, 1.0) * mined["seconds"])
        assert tree_bytes(out) == tree_bytes(mined["dir"])


def test_kill_mid_write_leaves_a_temp_file_that_the_rerun_removes(world, mined):
    out = world["tmp"] / "mine_temp"
    assert run_in_child(mining_job, str(out), kill_at="4@0.5") == KILLED  # write 4: shard 1 (after run.json, shard 0, its summary)
    temps = leftover_temps(out)
    assert [os.path.basename(os.path.dirname(p)) for p in temps] == ["shards"]
    assert os.path.basename(temps[0]).startswith(".shard_00001.json.")
    assert sorted(os.listdir(out / "shards")) == [os.path.basename(temps[0]), "shard_00000.json"]
    mining_job(str(out))
    assert leftover_temps(out) == [] and tree_bytes(out) == tree_bytes(mined["dir"])


def test_damaged_shard_is_named_and_re_made(world, mined, caplog):
    out = world["tmp"] / "mine_damaged"
    mining_job(str(out))
    shard = out / "shards" / "shard_00002.json"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DamagedFileError, match="shard_00002.json"):
        PartStore(out).read_shard(2)
    (out / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="part_distill.mining.store"):
        mining_job(str(out))
    assert any("shard_00002.json" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    assert tree_bytes(out) == tree_bytes(mined["dir"])


def test_damaged_manifest_is_named(world, mined):
    from part_distill.mining.store import read_manifest

    out = world["tmp"] / "mine_bad_manifest"
    mining_job(str(out))
    (out / "manifest.json").write_text('{"counts": ')
    with pytest.raises(DamagedFileError, match="manifest.json"):
        read_manifest(str(out))
    mining_job(str(out))  # a rerun writes it again from the shards
    assert tree_bytes(out) == tree_bytes(mined["dir"])


# ---------------------------------------------------------------- self-training: labels, then training
def _is_training_write(path):
    """A checkpoint, its tag, the EMA teacher or the round summary (the writes of training)."""
    name = os.path.basename(path)
    return name.startswith("model_") or name in ("last_checkpoint", "round.json")


def _intact_checkpoints(out, sub="round_0"):
    """{file name: iteration} of the training checkpoints in ``out/sub`` that load, each tried (brute force)."""
    rdir = os.path.join(out, sub)
    found = {}
    if not os.path.isdir(rdir):
        return found
    for name in os.listdir(rdir):
        if name.startswith("model_") and name.endswith(".pth") and name != "model_ema.pth":
            try:
                found[name] = torch.load(os.path.join(rdir, name), map_location="cpu", weights_only=False)["iteration"]
            except Exception:
                pass
    return found


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _assert_same_weights(path, ref_path):
    got, ref = _weights(path), _weights(ref_path)
    assert got.keys() == ref.keys()
    diff = [k for k in ref if not torch.equal(got[k], ref[k])]
    assert not diff, f"{os.path.basename(path)}: {len(diff)} tensors differ from the uninterrupted run, e.g. {diff[:3]}"


def _check_finished_round(out, ref, same_weights=False):
    info = json.loads((out / "round_0" / "round.json").read_text())
    assert info["iterations"] == ITERS
    assert torch.load(info["checkpoint"], weights_only=True)["iteration"] == ITERS - 1
    assert os.path.isfile(info["next_teacher"])
    assert tree_bytes(out / "round_0" / "labels") == tree_bytes(ref / "round_0" / "labels")
    if same_weights:
        for name in ("model_final.pth", "model_ema.pth"):
            _assert_same_weights(out / "round_0" / name, ref / "round_0" / name)
    return info


def test_self_train_writes_are_traced(self_trained):
    names = [os.path.relpath(p, self_trained["dir"] / "round_0") for p in self_trained["writes"]]
    n = SETTINGS.num_train
    assert names[: 2 * n + 2] == _store_writes("labels", n)
    numbered = [f"model_{i:07d}.pth" for i in range(ITERS)]  # period 1; the last one is also saved as final
    assert [x for x in names if x.startswith("model_")] == numbered + ["model_final.pth", "model_ema.pth"]
    assert names[-1] == "round.json"


def test_self_train_labelling_killed_anywhere_resumes_byte_identical(world, labelled, self_trained):
    n = SETTINGS.num_train
    assert [os.path.relpath(p, labelled["dir"]) for p in labelled["writes"]] == _store_writes("labels", n)
    ref = tree_bytes(labelled["dir"] / "labels")
    assert json.loads(ref["manifest.json"])["counts"]["parts"] > 0
    # The labels of a whole self-training round are these ones.
    assert tree_bytes(self_trained["dir"] / "round_0" / "labels") == ref
    for point in draw_kill_points(labelled["writes"], NUM_KILLS, seed=11):
        out = world["tmp"] / f"label_{point.replace('@', '_')}"
        _kill_then_finish(label_job, out, world["weights"], kill_at=point)
        assert tree_bytes(out / "labels") == ref, f"kill at write {point}"


def _check_resume(out, killed_state, ckpt_dir):
    """The rerun resumed at the newest intact checkpoint's iteration + 1 with that checkpoint's weights
    (at 0 from MODEL.WEIGHTS without one); returns that start iteration."""
    starts = [json.loads(line) for line in (out / "starts.jsonl").read_text().splitlines()]
    assert len(starts) == 2 and starts[0]["start_iter"] == 0  # the killed run, then the rerun
    resumed = starts[1]
    if not killed_state:
        assert resumed["resumed_from"] is None and resumed["start_iter"] == 0
        assert resumed["weights"] == starts[0]["weights"]
        return 0
    name, it = max(killed_state.items(), key=lambda kv: (kv[1], kv[0] == "model_final.pth"))
    assert resumed["start_iter"] == it + 1
    assert os.path.basename(resumed["resumed_from"]) == name
    saved = torch.load(os.path.join(ckpt_dir, name), map_location="cpu", weights_only=False)["model"]
    assert resumed["weights"] == state_digest(saved)
    return it + 1


@pytest.mark.slow
def test_self_train_training_killed_anywhere_resumes_from_last_saved_iteration(world, self_trained):
    starts = []
    writes = self_trained["writes"]
    # The random points, plus one inside the last write (round.json: its temp file sits in the round
    # directory, which the resumed trainer cleans).
    points = draw_kill_points(writes, NUM_KILLS, seed=5, select=_is_training_write) + [f"{len(writes)}@0.5"]
    for point in points:
        out = world["tmp"] / f"train_{point.replace('@', '_')}"
        killed_state = _kill_then_finish(self_train_job, out, world["weights"], kill_at=point)
        starts.append(_check_resume(out, killed_state, out / "round_0"))
        _check_finished_round(out, self_trained["dir"], same_weights=True)
    # The drawn points resume from more than one iteration (else the draw tested one case only).
    assert len(set(starts)) >= 2, starts


def test_damaged_checkpoint_is_named_and_training_resumes_before_it(world, self_trained, caplog, monkeypatch):
    out = world["tmp"] / "train_damaged"
    # Killed right after model_0000002.pth and its last_checkpoint tag were written.
    index = next(i for i, p in enumerate(self_trained["writes"], 1) if p.endswith("model_0000002.pth")) + 1
    assert run_in_child(self_train_job, str(out), world["weights"], kill_at=str(index)) == KILLED
    ckpt = out / "round_0" / "model_0000002.pth"
    assert (out / "round_0" / "last_checkpoint").read_text() == "model_0000002.pth"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    model = PartDistillTrainer.build_model(self_train_cfg(out, ""))
    with pytest.raises(DamagedFileError, match="model_0000002.pth"):
        PartDistillCheckpointer(model).load(str(ckpt))
    monkeypatch.setattr(PartDistillTrainer, "resume_or_load", PartDistillTrainer.resume_or_load)  # restored after
    threads = torch.get_num_threads()
    # In this process, to see its log; on one thread as the forked reference run (float sums
    # depend on the thread count).
    torch.set_num_threads(1)
    try:
        with caplog.at_level(logging.WARNING, logger="part_distill.modeling.checkpoint"):
            self_train_job(str(out), world["weights"])
    finally:
        torch.set_num_threads(threads)
    assert any("model_0000002.pth" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    resumed = json.loads((out / "starts.jsonl").read_text().splitlines()[-1])
    assert resumed["start_iter"] == 2 and resumed["resumed_from"].endswith("model_0000001.pth")
    # Re-made: iteration 2 was trained and saved again.
    assert torch.load(ckpt, weights_only=False)["iteration"] == 2
    _check_finished_round(out, self_trained["dir"], same_weights=True)


def test_supervised_training_killed_mid_training_resumes_from_last_saved_iteration(world):
    ref = world["tmp"] / "sup_ref"
    writes = trace_writes(supervised_job, str(ref), trace_file=world["tmp"] / "sup.trace")
    final = torch.load(ref / "model_final.pth", weights_only=False)
    assert final["iteration"] == ITERS - 1
    # Mid-training: inside or after a numbered checkpoint (model_final is the end of training).
    middle = lambda p: os.path.basename(p).startswith("model_0")  # noqa: E731
    starts = []
    for point in draw_kill_points(writes, 2, seed=2, select=middle):
        out = world["tmp"] / f"sup_{point.replace('@', '_')}"
        killed_state = _kill_then_finish(supervised_job, out, kill_at=point, ckpt_sub="")
        starts.append(_check_resume(out, killed_state, out))
        assert torch.load(out / "model_final.pth", weights_only=True)["iteration"] == ITERS - 1
        _assert_same_weights(out / "model_final.pth", ref / "model_final.pth")
    assert max(starts) > 0 and max(starts) < ITERS, starts
