"""End-to-end part mining on a tiny parts world (rgbxy features): resume, distribution, skips, partition."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import part_distill  # noqa: F401  (registers datasets)
from detectron2.data import DatasetCatalog
from part_distill.data.datasets.parts_world import register_parts_world
from part_distill.data.parts_world import WorldSettings
from part_distill.engine.setup import build_cfg
from part_distill.mining import miner as miner_mod
from part_distill.mining.kmeans import BatchedKMeans, assign
from part_distill.mining.miner import PartMiner, mine_parts
from part_distill.mining.object_sources import CocoResultsObjectSource, ModelObjectSource, MinedObject
from part_distill.mining.store import ConfigMismatchError, PartStore, read_manifest
from part_distill.utils.masks import decode_rle, encode_rle

SETTINGS = WorldSettings(num_train=7, num_val=1, image_size=64, max_objects=3)
EXTRA = "mine_test_extra"
TINY_ID = 987654


def _register(ds_root):
    """Tiny world + an extra dataset holding a corrupt image and a 2-pixel instance."""
    os.environ["DETECTRON2_DATASETS"] = ds_root
    register_parts_world(SETTINGS)
    corrupt = os.path.join(ds_root, "corrupt.png")

    def extra():
        dicts = [dict(d) for d in DatasetCatalog.get("parts_world_train")[:2]]
        if not os.path.exists(corrupt):
            with open(corrupt, "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\nthis is not an image")
        bad = dict(dicts[0], file_name=corrupt, image_id=10_000)
        tiny = np.zeros((dicts[1]["height"], dicts[1]["width"]), dtype=bool)
        tiny[5, 5:7] = True
        dicts[1]["annotations"] = list(dicts[1]["annotations"]) + [
            {"id": TINY_ID, "category_id": 0, "segmentation": encode_rle(tiny), "bbox": [5, 5, 2, 1],
             "bbox_mode": 1, "iscrowd": 0}]
        return dicts + [bad]

    DatasetCatalog.pop(EXTRA, None)
    DatasetCatalog.register(EXTRA, extra)


def _cfg(out_dir, *opts):
    return build_cfg("", [
        "MODEL.DEVICE", "cpu", "MINING.FEATURES", "rgbxy", "MINING.IMAGE_SIZE", "64",
        "MINING.SHARD_SIZE", "2", "MINING.BATCH_SIZE", "2", "MINING.MAX_ITER", "20",
        "MINING.DATASETS", f'("parts_world_train", "{EXTRA}")', "MINING.OUTPUT_DIR", str(out_dir),
        *opts])


def _files(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def _gloo_worker(ds_root, out_dir):
    # Runs in a spawned process: catalogs are per process, so register again.
    _register(ds_root)
    mine_parts(_cfg(out_dir))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ds"))
    old = os.environ.get("DETECTRON2_DATASETS")
    _register(root)
    out = tmp_path_factory.mktemp("mined") / "full"
    manifest = mine_parts(_cfg(out))
    yield {"root": root, "out": out, "manifest": manifest, "tmp": tmp_path_factory}
    DatasetCatalog.pop(EXTRA, None)
    if old is None:
        os.environ.pop("DETECTRON2_DATASETS", None)
    else:
        os.environ["DETECTRON2_DATASETS"] = old
    register_parts_world()


def test_skips_are_counted(world):
    m = world["manifest"]
    n_train = SETTINGS.num_train
    inputs = m["inputs"]["datasets"]
    assert [(d["name"], d["num_images"]) for d in inputs] == [("parts_world_train", n_train), (EXTRA, 3)]
    # the world by its settings key (its folder name), the unregistered-source dataset by its dicts
    assert inputs[0]["fingerprint"] == f"world:{SETTINGS.key}/train"
    assert inputs[1]["fingerprint"].startswith("dicts:")
    assert m["counts"]["images"] == n_train + 2
    assert m["counts"]["images_skipped"] == {"unreadable_image": 1}
    assert m["counts"]["instances_skipped"] == {"too_few_pixels": 1}
    store = PartStore(world["out"])
    shards = [store.read_shard(e["file"].split("/")[-1]) for e in m["shards"]]
    skipped = [s for sh in shards for s in sh["skipped_images"]]
    assert [s["file_name"].endswith("corrupt.png") for s in skipped] == [True]
    tiny = [o for sh in shards for o in sh["objects"] if o["source_id"] == TINY_ID]
    assert len(tiny) == 1 and tiny[0]["skip_reason"] == "too_few_pixels" and tiny[0]["num_parts"] == 0
    assert not [p for sh in shards for p in sh["annotations"] if p["object_id"] == tiny[0]["id"]]
    # Every GT object of the mined images is in the store.
    gt = DatasetCatalog.get("parts_world_train")
    n_gt = sum(len(d["annotations"]) for d in gt) + sum(len(d["annotations"]) for d in gt[:2]) + 1
    assert m["counts"]["instances"] == n_gt


def test_parts_partition_their_object(world):
    store = PartStore(world["out"])
    k = 4
    n_mined = 0
    for e in read_manifest(str(world["out"]))["shards"]:
        sh = store.read_shard(e["file"].split("/")[-1])
        parts = {}
        for p in sh["annotations"]:
            parts.setdefault(p["object_id"], []).append(p)
        for o in sh["objects"]:
            if o["skip_reason"] is not None:
                continue
            n_mined += 1
            obj = decode_rle(o["segmentation"])
            masks = [decode_rle(p["segmentation"]) for p in parts[o["id"]]]
            assert len(masks) == o["num_parts"] and 1 <= len(masks) <= k
            stack = np.stack(masks).astype(int)
            assert (stack.sum(0) <= 1).all(), "parts overlap"
            assert np.array_equal(stack.sum(0) == 1, obj), "parts do not cover exactly their object"
            assert all(p["area"] == m.sum() for p, m in zip(parts[o["id"]], masks))
    assert n_mined > 5


def test_killed_and_resumed_run_is_byte_identical(world, monkeypatch):
    out = world["tmp"].mktemp("resumed") / "run"
    cfg = _cfg(out)

    def kill(n_done):
        if n_done == 2:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(miner_mod, "_after_shard_hook", kill)
    with pytest.raises(KeyboardInterrupt):
        mine_parts(cfg)
    assert PartStore(out).existing_shards() == ["shard_00000.json", "shard_00001.json"]
    assert not os.path.exists(out / "manifest.json")
    monkeypatch.setattr(miner_mod, "_after_shard_hook", None)
    mined = []
    monkeypatch.setattr(PartMiner, "mine_batch", _spy(PartMiner.mine_batch, mined))
    mine_parts(cfg)
    assert min(mined) == 4, "the resumed run re-mined shards that were complete"
    assert _files(out) == _files(world["out"])


def _spy(fn, seen):
    def wrapped(self, items, seed):
        seen.extend(i for i, _ in items)
        return fn(self, items, seed)
    return wrapped


def test_config_change_is_refused(world):
    out = world["tmp"].mktemp("changed") / "run"
    mine_parts(_cfg(out))
    with pytest.raises(ConfigMismatchError, match="overwrite"):
        mine_parts(_cfg(out, "MINING.NUM_CLUSTERS", "3"))
    before = _files(out)
    m = mine_parts(_cfg(out, "MINING.NUM_CLUSTERS", "3"), overwrite=True)
    assert m["config"]["MINING"]["NUM_CLUSTERS"] == 3
    assert _files(out) != before
    # Keys that only change speed do not change the hash.
    assert mine_parts(_cfg(out, "MINING.NUM_CLUSTERS", "3", "MINING.CRF.NUM_WORKERS", "0"))["config_hash"] \
        == m["config_hash"]


def test_two_process_gloo_equals_one_process(world):
    from detectron2.engine import launch

    out = world["tmp"].mktemp("gloo") / "run"
    launch(_gloo_worker, 2, dist_url="auto", args=(world["root"], str(out)))
    assert _files(out) == _files(world["out"])


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_full_resolution_assignment_matches_assign_on_upsampled_features(metric):
    """Score-map upsampling == kmeans.assign on bilinearly upsampled (metric-normalised) features."""
    g = torch.Generator().manual_seed(0)
    d, gh, gw, s, k = 5, 6, 7, 8, 4
    grid = torch.randn(d, gh, gw, generator=g)
    centers = torch.randn(k, d, generator=g)
    if metric == "cosine":
        centers = F.normalize(centers, dim=1)
    H, W, size = 30, 37, (45, 53)  # original image, resized image (grid covers ceil(size / s))
    mask = torch.rand(H, W, generator=g).numpy() > 0.3
    miner = PartMiner(object_source=None, feature_extractor=type("E", (), {"stride": s})(),
                      kmeans=BatchedKMeans(num_clusters=k, metric=metric))
    labels, ys, xs = miner._assign_full(grid, centers, mask, size)

    x = F.normalize(grid, dim=0) if metric == "cosine" else grid
    # Brute-force bilinear interpolation at each pixel centre, border-clamped.
    gy = np.clip((ys + 0.5) * size[0] / H / s - 0.5, 0, gh - 1)
    gx = np.clip((xs + 0.5) * size[1] / W / s - 0.5, 0, gw - 1)
    y0, x0 = np.floor(gy).astype(int), np.floor(gx).astype(int)
    y1, x1 = np.minimum(y0 + 1, gh - 1), np.minimum(x0 + 1, gw - 1)
    wy, wx = torch.tensor(gy - y0, dtype=torch.float32), torch.tensor(gx - x0, dtype=torch.float32)
    xn = x.numpy()
    f = lambda a, b: torch.from_numpy(xn[:, a, b].T)  # noqa: E731
    up = (f(y0, x0) * ((1 - wy) * (1 - wx))[:, None] + f(y0, x1) * ((1 - wy) * wx)[:, None]
          + f(y1, x0) * (wy * (1 - wx))[:, None] + f(y1, x1) * (wy * wx)[:, None])
    expected = assign(up, centers, metric).numpy()
    assert len(labels) == mask.sum()
    assert (labels == expected).mean() > 0.999  # float ties aside


def test_coco_json_and_model_sources_threshold_and_topn():
    h, w = 8, 9
    masks = [np.zeros((h, w), bool) for _ in range(4)]
    for i, m in enumerate(masks):
        m[i, : i + 1] = True
    rows = [{"image_id": 3, "category_id": 7 + i, "segmentation": encode_rle(m), "score": s}
            for i, (m, s) in enumerate(zip(masks, [0.9, 0.2, 0.95, 0.6]))]
    rows.append({"image_id": 4, "category_id": 1, "segmentation": encode_rle(masks[0]), "score": 1.0})
    src = CocoResultsObjectSource(results=rows, score_thresh=0.5, topn=2)
    objs = src({"image_id": 3, "height": h, "width": w})
    assert [o.category_id for o in objs] == [9, 7]
    assert np.array_equal(objs[0].mask, masks[2]) and np.array_equal(objs[1].mask, masks[0])
    assert src({"image_id": 5, "height": h, "width": w}) == []

    from detectron2.structures import Instances

    inst = Instances((h, w), pred_masks=torch.from_numpy(np.stack(masks)),
                     scores=torch.tensor([0.9, 0.2, 0.95, 0.6]), pred_classes=torch.tensor([1, 2, 3, 4]))
    msrc = ModelObjectSource(predictor=lambda image, dd: inst, score_thresh=0.5, topn=0)
    objs = msrc({"height": h, "width": w}, np.zeros((h, w, 3), np.uint8))
    assert [(o.source_id, o.category_id) for o in objs] == [(2, 3), (0, 1), (3, 4)]
    assert isinstance(objs[0], MinedObject)


def test_nan_features_are_skipped_with_their_reason(world):
    from part_distill.mining.features import RGBXYFeatures
    from part_distill.mining.miner import records_to_shard
    from part_distill.mining.object_sources import GTObjectSource

    class NaNLeftHalf(RGBXYFeatures):
        def forward(self, images):
            f = super().forward(images)
            f[..., : f.shape[-1] // 2] = float("nan")
            return f

    dicts = [dict(d, _mining_dataset="t") for d in DatasetCatalog.get("parts_world_train")[:4]]
    miner = PartMiner(object_source=GTObjectSource(), feature_extractor=NaNLeftHalf(stride=8),
                      kmeans=BatchedKMeans(num_clusters=4, metric="l2", nan_policy="skip"), image_size=64)
    shard = records_to_shard(miner.mine_batch(list(enumerate(dicts)), 0), 0, "h")
    # 64-px images, stride 8: the NaN cells are exactly the pixels with x < 32.
    expect = {a["id"]: decode_rle(a["segmentation"])[:, :32].any() for d in dicts for a in d["annotations"]}
    got = {o["source_id"]: o["skip_reason"] == "nan_features" for o in shard["objects"]}
    assert got == expect and any(expect.values()) and not all(expect.values())
    assert shard["counts"]["instances_skipped"].get("nan_features") == sum(expect.values())
    # The default policy "raise" (MINING.NAN_POLICY) stops at the first such object, naming its image.
    miner.kmeans.nan_policy = "raise"
    first_bad = next(d for d in dicts if any(expect[a["id"]] for a in d["annotations"]))
    with pytest.raises(ValueError, match=f"non-finite features .*{os.path.basename(first_bad['file_name'])}"):
        miner.mine_batch(list(enumerate(dicts)), 0)
