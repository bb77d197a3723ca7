"""Dataset-level part mining (MINING.LEVEL "dataset"): per-class k-means checked against scikit-learn."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

import part_distill  # noqa: F401  (registers datasets)
from detectron2.data import DatasetCatalog
from part_distill.data.parts_world import WorldSettings
from part_distill.engine.setup import build_cfg
from part_distill.mining.miner import PartMiner, mine_parts
from part_distill.mining.store import PartStore, read_manifest
from part_distill.utils.masks import decode_rle

SETTINGS = WorldSettings(num_train=6, num_val=1, image_size=64, max_objects=3)
K = 3


def _cfg(out_dir="", *opts):
    # IMAGE_SIZE = image size: features are computed on the original pixel grid (no resize).
    return build_cfg("", [
        "MODEL.DEVICE", "cpu", "MINING.FEATURES", "rgbxy", "MINING.IMAGE_SIZE", "64",
        "MINING.LEVEL", "dataset", "MINING.METRIC", "l2", "MINING.NUM_CLUSTERS", str(K),
        "MINING.SHARD_SIZE", "2", "MINING.BATCH_SIZE", "2", "MINING.DATASETS", '("parts_world_train",)',
        "MINING.OUTPUT_DIR", str(out_dir), *opts])


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_world_factory):
    tiny_world_factory(SETTINGS)
    yield tmp_path_factory


def _collect(miner, bsize, reverse=False):
    items = list(enumerate(DatasetCatalog.get("parts_world_train")))
    batches = [items[b:b + bsize] for b in range(0, len(items), bsize)]
    out = []
    for batch in (batches[::-1] if reverse else batches):
        out += miner.collect_batch(batch)
    return out


def _class_points(collected, cat):
    rows = sorted((r for r in collected if r[2] == cat), key=lambda r: r[:2])
    return torch.cat([r[3] for r in rows]).double().numpy(), torch.cat([r[4] for r in rows]).double().numpy()


def _inertia(x, w, c):
    return float((w * ((x[:, None] - c[None]) ** 2).sum(-1).min(1)).sum())


def test_class_centers_match_sklearn(world):
    miner = PartMiner(_cfg())
    collected = _collect(miner, 2)
    centers = miner.fit_classes(collected, seed=0)
    cats = sorted({r[2] for r in collected})
    assert sorted(centers) == cats and len(cats) >= 2
    n_obj = sum(len(d["annotations"]) for d in DatasetCatalog.get("parts_world_train"))
    assert len(collected) == n_obj
    for cat in cats:
        x, w = _class_points(collected, cat)
        ours = centers[cat].double().numpy()
        # A converged Lloyd solution: scikit-learn started from our centers does not move them.
        sk_fixed = KMeans(K, init=ours, n_init=1, max_iter=300, tol=0).fit(x, sample_weight=w)
        np.testing.assert_allclose(sk_fixed.cluster_centers_, ours, rtol=1e-4, atol=1e-5)
        assert _inertia(x, w, ours) == pytest.approx(sk_fixed.inertia_, rel=1e-6)
        # Not degenerate: every part of the class owns weight (empty clusters were repaired).
        assert len(np.unique(sk_fixed.labels_[w > 0])) == K
    # The fit depends on the points, not on how they were batched or in which order collected.
    other = PartMiner(_cfg()).fit_classes(_collect(miner, 3, reverse=True), seed=0)
    for cat in cats:
        assert torch.equal(other[cat], centers[cat])


def _stored_parts(out):
    store = PartStore(out)
    parts, objects = {}, []
    for e in read_manifest(str(out))["shards"]:
        sh = store.read_shard(e["file"].split("/")[-1])
        objects += sh["objects"]
        for p in sh["annotations"]:
            parts.setdefault(p["object_id"], []).append(p)
    return objects, parts


def test_mined_parts_are_nearest_class_center(world):
    out = world.mktemp("mined") / "dataset_level"
    cfg = _cfg(out)
    manifest = mine_parts(cfg)
    dicts = DatasetCatalog.get("parts_world_train")
    assert manifest["counts"]["images"] == len(dicts)
    assert manifest["counts"]["instances_skipped"] == {}

    # Brute force: per-pixel rgbxy features (grid upsampled to the image), nearest class center.
    miner = PartMiner(cfg)
    centers = miner.fit_classes(_collect(miner, 2), seed=0)
    objects, parts = _stored_parts(out)
    by_image = {o["image_id"]: [] for o in objects}
    for o in objects:
        by_image[o["image_id"]].append(o)
    agree = total = 0
    for index, d in enumerate(dicts):
        grids, _ = miner._extract([miner._read(d)[0]])
        feat = F.interpolate(grids[0][None].double(), size=(d["height"], d["width"]), mode="bilinear",
                             align_corners=False)[0].numpy()
        for o in by_image[index + 1]:
            obj = decode_rle(o["segmentation"])
            c = centers[o["category_id"]].double().numpy()
            x = feat[:, obj].T
            expect = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
            got = np.full(obj.shape, -1)
            for p in parts[o["id"]]:
                m = decode_rle(p["segmentation"])
                assert not (got[m] >= 0).any(), "parts overlap"
                got[m] = p["cluster"]
            assert (got[obj] >= 0).all() and (got[~obj] == -1).all(), "parts do not partition the object"
            agree += int((got[obj] == expect).sum())
            total += int(obj.sum())
    assert total > 500 and agree / total > 0.999


def test_shard_and_batch_sizes_do_not_change_parts(world):
    outs = []
    for shard, batch in (("2", "2"), ("4", "3")):
        out = world.mktemp("mined") / f"s{shard}b{batch}"
        mine_parts(_cfg(out, "MINING.SHARD_SIZE", shard, "MINING.BATCH_SIZE", batch))
        objects, parts = _stored_parts(out)
        outs.append(sorted((p["id"], p["segmentation"]["counts"]) for ps in parts.values() for p in ps))
    assert outs[0] == outs[1] and len(outs[0]) > 10
