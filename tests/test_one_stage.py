"""The one-stage baseline: cluster-slot labels from a dataset-level store, its resumable stage, the
part mask adapter, and contiguous ids for objects read from a COCO-results file."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import part_distill  # noqa: F401  (registers datasets and models)
from detectron2.data import DatasetCatalog
from part_distill.data.pseudo_labels import PART_LABEL_KEY, PseudoLabelFilters, load_pseudo_labels
from part_distill.engine import one_stage
from part_distill.engine.trainer import PartDistillTrainer
from part_distill.mining.miner import mine_parts
from part_distill.mining.object_sources import CocoResultsObjectSource
from part_distill.mining.store import PART_STRIDE, PartStore, read_manifest
from part_distill.modeling.part_mask_adapter import PartMaskAdapter
from part_distill.utils.masks import encode_rle

from test_self_training import tiny_cfg, world  # noqa: F401  (module fixture: a tiny parts world)

K = 2  # CLUSTERS_PER_CLASS of tiny_cfg


def _mine(out_dir, level):
    from part_distill.engine.setup import build_cfg

    cfg = build_cfg("", ["MODEL.DEVICE", "cpu", "MINING.FEATURES", "rgbxy", "MINING.IMAGE_SIZE", "64",
                         "MINING.LEVEL", level, "MINING.METRIC", "l2", "MINING.NUM_CLUSTERS", str(K),
                         "MINING.SHARD_SIZE", "2", "MINING.BATCH_SIZE", "2",
                         "MINING.DATASETS", '("parts_world_train",)', "MINING.OUTPUT_DIR", str(out_dir)])
    mine_parts(cfg)
    return os.path.join(str(out_dir), "manifest.json")


@pytest.fixture(scope="module")
def stores(world):  # noqa: F811
    tmp = world["tmp"]
    return {"dataset": _mine(tmp / "mined_ds", "dataset"), "instance": _mine(tmp / "mined_inst", "instance")}


def test_cluster_slot_labels(stores):
    dicts = load_pseudo_labels(stores["dataset"], cluster_slots=K)
    store = PartStore(os.path.dirname(stores["dataset"]))
    parts = {}
    for entry in read_manifest(stores["dataset"])["shards"]:
        for p in store.read_shard(os.path.basename(entry["file"]))["annotations"]:
            parts[p["id"]] = p
    seen = 0
    for d in dicts:
        for a in d["annotations"]:
            p = parts[a["id"]]
            assert a[PART_LABEL_KEY] == p["object_category_id"] * K + p["id"] % PART_STRIDE
            assert a["category_id"] == 0
            seen += 1
    assert seen > 0
    # the slots of a class are its k dataset-level clusters, all used somewhere
    used = {a[PART_LABEL_KEY] % K for d in dicts for a in d["annotations"]}
    assert used == set(range(K))
    with pytest.raises(ValueError, match="LEVEL 'dataset'"):
        load_pseudo_labels(stores["instance"], cluster_slots=K)
    with pytest.raises(ValueError, match="NUM_CLUSTERS"):
        load_pseudo_labels(stores["dataset"], cluster_slots=K + 1)


def test_one_stage_trains_on_slots_and_resumes(world, stores, monkeypatch):  # noqa: F811
    tmp = world["tmp"]
    cfg = tiny_cfg(tmp / "one_stage", "MODEL.WEIGHTS", world["weights"],
                   "MODEL.PART_DISTILL.NUM_PART_CLASSES", str(7 * K), "INPUT.PART_CLASS_KEY", PART_LABEL_KEY,
                   "PART_DISTILL.PSEUDO_LABELS.MANIFEST", stores["dataset"], "SOLVER.MAX_ITER", "2",
                   "PART_DISTILL.SELF_TRAIN.ITERS_PER_ROUND", "2", "PART_DISTILL.ONE_STAGE.ROUNDS", "1",
                   # identity augmentation: the targets are the store's parts themselves, none cropped away
                   "INPUT.MIN_SCALE", "1.0", "INPUT.MAX_SCALE", "1.0", "INPUT.RANDOM_FLIP", "none")
    from part_distill.modeling.meta_arch.part_distillation import PartDistillationModel

    seen = []
    real_losses = PartDistillationModel.losses

    def spy(self, batched_inputs, *args):
        seen.append(batched_inputs)
        return real_losses(self, batched_inputs, *args)

    monkeypatch.setattr(PartDistillationModel, "losses", spy)
    info = one_stage.run_one_stage(cfg)
    monkeypatch.undo()
    # the initial student's targets are exactly the store's cluster slots of each part
    by_file = {d["file_name"]: d for d in load_pseudo_labels(stores["dataset"], PseudoLabelFilters.from_config(cfg),
                                                             cluster_slots=K)}
    checked = 0
    for batch in seen[:2]:
        for x in batch:
            want = sorted(a[PART_LABEL_KEY] for a in by_file[x["file_name"]]["annotations"])
            got = sorted(x["parts"].gt_classes.tolist())
            assert got == want, x["file_name"]
            checked += len(got)
    assert checked > 0
    ckpt = torch.load(info["checkpoint"], weights_only=False)["model"]
    assert ckpt["part_predictor.class_embed.weight"].shape[0] == 7 * K + 1
    labels_dir = tmp / "one_stage" / "round_0" / "labels" / "shards"
    anns = [a for f in sorted(os.listdir(labels_dir)) for a in json.load(open(labels_dir / f))["annotations"]]
    assert anns and all(a[PART_LABEL_KEY] // K == a["object_category_id"] for a in anns)

    def boom(*a, **k):
        raise AssertionError("a finished one-stage run must not train again")

    monkeypatch.setattr(PartDistillTrainer, "train", boom)
    again = one_stage.run_one_stage(cfg)
    assert again["checkpoint"] == info["checkpoint"]


def _adapter_fit(skip_feature="res2", shuffle=False, steps=80):
    """Held-out MSE / its value at initialisation of an adapter trained (Adam) to add to 8-dim mask
    features a fixed linear map of a 5-channel stride-4 level (2x average-pooled). ``shuffle`` pairs the
    training targets with another sample's inputs: nothing to learn that carries over."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    proj = torch.randn(8, 5, generator=g)

    def samples(n):
        mask, skip = torch.randn(n, 8, 12, 12, generator=g), torch.randn(n, 5, 24, 24, generator=g)
        return mask, {"res2": skip}, mask + F.avg_pool2d(torch.einsum("oc,nchw->nohw", proj, skip), 2)

    (mask, feats, target), held_out = samples(8), samples(8)
    if shuffle:
        target = target.roll(1, 0)
    adapter = PartMaskAdapter(mask_dim=8, hidden_dim=32, num_convs=2, skip_channels=5, skip_feature=skip_feature,
                              norm="GN")
    opt = torch.optim.Adam(adapter.parameters(), lr=3e-3)
    with torch.no_grad():
        initial = F.mse_loss(adapter(held_out[0], held_out[1]), held_out[2]).item()
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(adapter(mask, feats), target).backward()
        opt.step()
    with torch.no_grad():
        return F.mse_loss(adapter(held_out[0], held_out[1]), held_out[2]).item() / initial


def test_part_mask_adapter_starts_as_identity_and_learns_from_the_skip_level():
    torch.manual_seed(0)
    adapter = PartMaskAdapter(mask_dim=8, hidden_dim=32, num_convs=2, skip_channels=5, skip_feature="res2",
                              norm="GN")
    mask = torch.randn(2, 8, 12, 12)
    assert torch.equal(adapter(mask, {"res2": torch.randn(2, 5, 24, 24)}), mask)
    # It learns what the skip level tells (held-out error down to < 30 %); the controls cannot: the same
    # training on mismatched targets, and an adapter without the skip level, stay near (or above) the start.
    assert _adapter_fit() < 0.3
    assert _adapter_fit(shuffle=True) > 0.8
    assert _adapter_fit(skip_feature="") > 0.8
    with pytest.raises(ValueError, match="NUM_CONVS"):
        PartMaskAdapter(mask_dim=8, hidden_dim=6, num_convs=0)


def test_adapter_keeps_instance_decoder_on_encoder_features(world):  # noqa: F811
    cfg = tiny_cfg(world["tmp"] / "adapter", "MODEL.PART_DISTILL.FREEZE", "encoder",
                   "MODEL.PART_DISTILL.MASK_ADAPTER.NUM_CONVS", "1",
                   "MODEL.PART_DISTILL.MASK_ADAPTER.SKIP_FEATURE", "res2")
    torch.manual_seed(0)
    model = PartDistillTrainer.build_model(cfg).eval()
    torch.nn.init.normal_(model.part_mask_adapter.out.weight)
    x = torch.randn(1, 3, 64, 64)
    feats = model.encode_for_parts(x)
    direct, _ = model.sem_seg_head.encode(model.backbone(x))
    assert torch.equal(feats.mask_features, direct) and not torch.allclose(feats.part_mask_features, direct)
    model.train()
    assert model.part_mask_adapter.training and not model.backbone.training
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"part_predictor", "part_mask_adapter"}


def test_coco_results_objects_map_to_contiguous_ids(world):  # noqa: F811
    from part_distill.engine.setup import build_cfg

    d = DatasetCatalog.get("parts_world_train")[0]
    mask = np.zeros((d["height"], d["width"]), bool)
    mask[2:10, 3:9] = True
    rows = [{"image_id": d["image_id"], "category_id": 3, "segmentation": encode_rle(mask), "score": 0.9}]
    path = world["tmp"] / "objects.json"
    path.write_text(json.dumps(rows, default=lambda b: b.decode()))
    opts = ["MINING.OBJECT_SOURCE", "coco_json", "MINING.OBJECT_JSON", str(path),
            "MINING.DATASETS", '("parts_world_train",)']
    raw = CocoResultsObjectSource(build_cfg("", opts))(d)
    mapped = CocoResultsObjectSource(build_cfg("", opts + ["MINING.OBJECT_JSON_CONTIGUOUS", "True"]))(d)
    assert raw[0].category_id == 3 and mapped[0].category_id == 2  # parts_world ids 1..7 -> 0..6
    assert np.array_equal(mapped[0].mask, mask)
    rows[0]["category_id"] = 99
    path.write_text(json.dumps(rows, default=lambda b: b.decode()))
    with pytest.raises(ValueError, match="not a category"):
        CocoResultsObjectSource(build_cfg("", opts + ["MINING.OBJECT_JSON_CONTIGUOUS", "True"]))(d)
