"""Two CPU processes (gloo, detectron2's ``launch``) against one: dataset-level mining and self-training
label sharding give the 1-process stores byte for byte; DDP part-decoder training keeps the ranks'
weights equal and saves exactly them.

One 2-process launch runs the three jobs (spawning costs more than the jobs); the 1-process
references run in the test process.
"""
import json
import os

import pytest
import torch

import part_distill  # noqa: F401  (registers datasets and models)
from _tiny_part_model import tiny_world_part_opts
from _kill_harness import state_digest, tree_bytes
from detectron2.data import DatasetCatalog
from detectron2.utils import comm
from part_distill.data.datasets.parts_world import register_parts_world
from part_distill.data.parts_world import WorldSettings
from part_distill.data.pseudo_labels import PseudoLabelFilters
from part_distill.engine.part_labels import unwrap
from part_distill.engine.self_training import _label_round, register_labelled_parts, with_overrides
from part_distill.engine.setup import build_cfg
from part_distill.engine.trainer import PartDistillTrainer
from part_distill.mining.miner import mine_parts
from part_distill.modeling.checkpoint import PartDistillCheckpointer

SETTINGS = WorldSettings(seed=5, num_train=5, num_val=1, image_size=64, max_objects=2)
TRAIN_ITERS = 3

pytestmark = pytest.mark.slow


def mining_cfg(out):
    return build_cfg("", [
        "MODEL.DEVICE", "cpu", "MINING.FEATURES", "rgbxy", "MINING.IMAGE_SIZE", "64", "MINING.LEVEL", "dataset",
        "MINING.METRIC", "l2", "MINING.NUM_CLUSTERS", "3", "MINING.SHARD_SIZE", "1", "MINING.BATCH_SIZE", "1",
        "MINING.DATASETS", '("parts_world_train",)', "MINING.OUTPUT_DIR", str(out)])


def part_cfg(out, weights, *opts):
    return build_cfg("", tiny_world_part_opts(out, weights) + [
        "SOLVER.BASE_LR", "0.001", "SOLVER.MAX_ITER", str(TRAIN_ITERS), "SOLVER.CHECKPOINT_PERIOD", "100", *opts])


def label_job(out, weights):
    cfg = part_cfg(out, weights)
    _label_round(cfg, cfg, weights, str(out), "self_train", 0, None)


def train_job(out, weights, labels_dir):
    """A few DDP iterations on the label store; each rank writes its final weights' digest."""
    cfg = part_cfg(out, weights)
    name = register_labelled_parts("mp_test_labels", str(labels_dir), PseudoLabelFilters.from_config(cfg))
    trainer = PartDistillTrainer(with_overrides(cfg, **{"DATASETS.TRAIN": (name,)}))
    trainer.resume_or_load(resume=False)
    trainer.train()
    with open(os.path.join(out, f"rank{comm.get_rank()}.json"), "w") as f:
        json.dump({"weights": state_digest(unwrap(trainer.model).state_dict()),
                   "ddp": type(trainer.model).__name__}, f)


def _worker(ds_root, out, weights, ref_labels):
    # Spawned: catalogs are per process, so register the world again.
    os.environ["DETECTRON2_DATASETS"] = ds_root
    register_parts_world(SETTINGS)
    mine_parts(mining_cfg(os.path.join(out, "mine")))
    label_job(os.path.join(out, "labels"), weights)
    # Trained on the 1-process labels, so this job does not depend on the label job being right.
    train_job(os.path.join(out, "train"), weights, ref_labels)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from detectron2.engine import launch

    ds_root = str(tmp_path_factory.mktemp("ds"))
    old = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = ds_root
    register_parts_world(SETTINGS)
    DatasetCatalog.get("parts_world_train")  # generate the world once, before the workers read it
    tmp = tmp_path_factory.mktemp("mp")
    torch.manual_seed(0)
    weights = str(tmp / "teacher.pth")
    torch.save({"model": PartDistillTrainer.build_model(part_cfg(tmp / "init", "")).state_dict()}, weights)
    one, two = tmp / "one", tmp / "two"
    mine_parts(mining_cfg(one / "mine"))
    label_job(one / "labels", weights)
    launch(_worker, 2, dist_url="auto", args=(ds_root, str(two), weights, str(one / "labels")))
    yield {"one": one, "two": two, "weights": weights}
    if old is None:
        os.environ.pop("DETECTRON2_DATASETS", None)
    else:
        os.environ["DETECTRON2_DATASETS"] = old
    register_parts_world()


def test_two_process_dataset_level_mining_equals_one_process(runs):
    one = tree_bytes(runs["one"] / "mine")
    assert len([n for n in one if n.startswith("shards/")]) == SETTINGS.num_train
    assert tree_bytes(runs["two"] / "mine") == one


def test_two_process_label_sharding_equals_one_process(runs):
    one = tree_bytes(runs["one"] / "labels")
    manifest = json.loads(one["manifest.json"])
    assert len(manifest["shards"]) == SETTINGS.num_train and manifest["counts"]["parts"] > 0
    assert tree_bytes(runs["two"] / "labels") == one


def test_ddp_training_saves_the_rank_synchronised_weights(runs):
    out = runs["two"] / "train"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["ddp"] for r in ranks] == ["DistributedDataParallel"] * 2
    # The ranks train on different shards of the sample stream; all-reduced gradients keep them equal.
    assert ranks[0]["weights"] == ranks[1]["weights"]
    ckpt = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == TRAIN_ITERS - 1
    model = PartDistillTrainer.build_model(part_cfg(out, ""))
    PartDistillCheckpointer(model).load(str(out / "model_final.pth"))
    loaded = state_digest(model.state_dict())
    assert loaded == ranks[0]["weights"]
    # Control: training moved the weights away from the teacher's.
    PartDistillCheckpointer(model).load(runs["weights"])
    assert state_digest(model.state_dict()) != loaded
