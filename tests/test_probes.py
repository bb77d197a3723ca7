"""Part-awareness probes: metrics against brute force / scikit-learn / the evaluation module, weights loading."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score

import part_distill  # noqa: F401  (registers datasets and backbones)
from detectron2.data import DatasetCatalog
from part_distill.data.parts_world import WorldSettings
from part_distill.engine.setup import build_cfg
from part_distill.evaluation.average_recall import PartAREvaluator
from part_distill.mining.store import PartStore, read_manifest
from part_distill.probes import (LinearProbe, confusion_matrix, iou_from_confusion, mean_iou, merge_rows,
                                 pixel_grid_coords, predict_labels, retrieval_average_precision, run_grouping_probe,
                                 sample_logits, train_linear_probe)
from part_distill.probes.data import IGNORE, semantic_part_labels
from part_distill.probes.retrieval import _crop, ranked_average_precision
from part_distill.probes.runner import build_probe_extractors
from part_distill.utils.masks import decode_rle
from detectron2.structures import Instances

SETTINGS = WorldSettings(num_train=3, num_val=4, image_size=64, max_objects=3)


# ---------------------------------------------------------------- linear probe mIoU
def test_confusion_miou_equals_bruteforce_per_class_iou():
    rng = np.random.default_rng(0)
    c = 6
    gt = rng.integers(0, c - 1, size=(3, 20, 17))  # class 5 never in the GT ...
    pred = rng.integers(0, c, size=gt.shape)       # ... but predicted: IoU 0, counted
    gt[rng.random(gt.shape) < 0.2] = IGNORE
    pred[gt == 2] = 2                                # class 2 perfect where it is GT
    pred[pred == 2] = np.where(gt[pred == 2] == 2, 2, 1)
    conf = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), c)
    keep = gt != IGNORE
    ious = {}
    for k in range(c):
        p, g = (pred == k) & keep, (gt == k) & keep
        union = (p | g).sum()
        if union:
            ious[k] = (p & g).sum() / union
    assert ious[2] == 1.0 and ious[5] == 0.0
    np.testing.assert_allclose(iou_from_confusion(conf)[list(ious)], list(ious.values()))
    parts = [k for k in ious if k >= 1]
    assert mean_iou(conf, range(1, c)) == pytest.approx(100 * np.mean([ious[k] for k in parts]))
    # A class neither in the GT nor predicted is left out, not counted as 0 or 1.
    conf2 = confusion_matrix(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), 3)
    assert np.isnan(iou_from_confusion(conf2)[1:]).all() and mean_iou(conf2, [0, 1, 2]) == 100.0


def test_linear_probe_on_label_encoding_features_reaches_miou_100():
    rng = np.random.default_rng(1)
    num_classes, h, w = 4, 12, 10
    labels, grids, sizes = [], [], []
    for _ in range(6):
        y = rng.integers(0, num_classes, size=(h, w))
        # Features = one-hot label plus a constant channel and noise channels: perfectly separable.
        onehot = np.eye(num_classes)[y].transpose(2, 0, 1)
        feat = np.concatenate([onehot, rng.normal(0, 0.05, size=(3, h, w))])
        y = y.copy()
        y[rng.random((h, w)) < 0.1] = IGNORE
        labels.append(torch.from_numpy(y))
        grids.append(torch.from_numpy(feat).float())
        sizes.append((h, w))
    probe = train_linear_probe(grids, labels, sizes, 1, num_classes, iters=150, lr=0.1, batch_size=4,
                               points_per_image=64, seed=0)
    conf = sum(confusion_matrix(predict_labels(probe, g, s, 1, y.shape), y, num_classes)
               for g, s, y in zip(grids, sizes, labels))
    assert mean_iou(conf, range(1, num_classes)) == 100.0
    # Same seed -> the same probe.
    again = train_linear_probe(grids, labels, sizes, 1, num_classes, iters=150, lr=0.1, batch_size=4,
                               points_per_image=64, seed=0)
    assert torch.equal(again.conv.weight, probe.conv.weight)


@pytest.mark.parametrize("stride", [1, 4])
def test_sampled_logits_equal_bilinear_upsampling(stride):
    """Pixel-centre sampling of the grid logits = F.interpolate of the logits to the label size."""
    torch.manual_seed(0)
    probe = LinearProbe(5, 3)
    grid = torch.randn(5, 6, 7)
    out_hw = (6 * stride, 7 * stride)
    with torch.no_grad():
        ref = F.interpolate(probe(grid[None]), size=out_hw, mode="bilinear", align_corners=False)[0]
        ys, xs = torch.meshgrid(torch.arange(out_hw[0]), torch.arange(out_hw[1]), indexing="ij")
        coords = pixel_grid_coords(ys.reshape(-1), xs.reshape(-1), out_hw, out_hw, stride, grid.shape[1:])
        got = sample_logits(probe, grid, coords).reshape(3, *out_hw)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(predict_labels(probe, grid, out_hw, stride, out_hw), got.argmax(0))


# ---------------------------------------------------------------- retrieval AP
def _sklearn_aps(emb, labels):
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = x @ x.T
    out = []
    for i in range(len(labels)):
        others = np.arange(len(labels)) != i
        y = labels[others] == labels[i]
        out.append(average_precision_score(y, sims[i, others]) if y.any() else np.nan)
    return np.array(out)


def test_retrieval_map_equals_sklearn():
    rng = np.random.default_rng(2)
    n = 70
    labels = rng.integers(0, 5, size=n)
    labels[0] = 99  # a query without positives: NaN, left out of the mean
    emb = rng.normal(size=(n, 16))
    ref = _sklearn_aps(emb, labels)
    ap = retrieval_average_precision(torch.from_numpy(emb), torch.from_numpy(labels), query_chunk=16)
    assert np.isnan(ap[0]) and np.isnan(ref[0])
    np.testing.assert_allclose(ap[1:], ref[1:], rtol=1e-9, atol=1e-12)
    assert np.nanmean(ap) == pytest.approx(np.nanmean(ref))


def test_ranked_ap_treats_ties_as_sklearn():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, size=(40, 25)).astype(float)  # many exact ties
    rel = rng.random((40, 25)) < 0.3
    rel[0] = False
    ap = ranked_average_precision(torch.from_numpy(scores), torch.from_numpy(rel)).numpy()
    assert np.isnan(ap[0])
    ref = [average_precision_score(r, s) for r, s in zip(rel[1:], scores[1:])]
    np.testing.assert_allclose(ap[1:], ref, rtol=1e-12)


def test_crop_is_centred_and_padded():
    img = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    c = _crop(img, 1.0, 11.0, 6, np.array([7, 8, 9], np.uint8))
    # Window rows -2..3, cols 8..13: the image pixel (0, 8) lands at (2, 0); rows/cols outside are padding.
    np.testing.assert_array_equal(c[2:, :4], img[0:4, 8:12])
    assert (c[:2] == [7, 8, 9]).all() and (c[:, 4:] == [7, 8, 9]).all()


def test_merge_rows_replaces_same_label_and_appends_new():
    old = [{"label": "a", "v": 1}, {"label": "b", "v": 2}]
    new = [{"label": "b", "v": 3}, {"label": "c", "v": 4}]
    assert merge_rows(old, new) == [{"label": "a", "v": 1}, {"label": "b", "v": 3}, {"label": "c", "v": 4}]


# ---------------------------------------------------------------- on a tiny registered world
@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_world_factory):
    tiny_world_factory(SETTINGS)
    yield tmp_path_factory


def test_grouping_probe_ar_equals_part_ar_evaluator(world):
    store = str(world.mktemp("grouping") / "store")
    cfg = build_cfg("", ["MODEL.DEVICE", "cpu", "MINING.FEATURES", "rgbxy", "MINING.IMAGE_SIZE", "64",
                         "MINING.MAX_ITER", "20"])
    res = run_grouping_probe(cfg, "parts_world_val_parts", store)
    dicts = DatasetCatalog.get("parts_world_val_parts")
    assert res["instances"] == sum(len(d["annotations"]) for d in dicts)
    # Independent path: decode the shards ourselves and feed PartAREvaluator built from kwargs.
    ev = PartAREvaluator("parts_world_val_parts", ks=(1, 10), modes=("overlap",), restrictions=("none",),
                         distributed=False)
    ev.reset()
    ps = PartStore(store)
    for e in read_manifest(store)["shards"]:
        sh = ps.read_shard(os.path.basename(e["file"]))
        for img in sh["images"]:
            parts = [p for p in sh["annotations"] if p["image_id"] == img["id"]]
            inst = Instances((img["height"], img["width"]))
            inst.pred_masks = torch.from_numpy(np.stack([decode_rle(p["segmentation"]) for p in parts]))
            inst.scores = torch.ones(len(parts))
            inst.pred_clusters = torch.full((len(parts),), -1, dtype=torch.long)
            inst.object_index = torch.full((len(parts),), -1, dtype=torch.long)
            inst.object_classes = torch.full((len(parts),), -1, dtype=torch.long)
            ev.process([{"image_id": img["source_image_id"]}], [{"parts": inst}])
    ref = ev.evaluate()["parts_ar"]
    assert res["AR@10"] > 0
    assert (res["AR@1"], res["AR@10"]) == (ref["AR@1"], ref["AR@10"])


def test_semantic_labels_follow_gt_parts(world):
    maps = semantic_part_labels("parts_world_val_parts")
    for d in DatasetCatalog.get("parts_world_val_parts"):
        lab = maps[d["image_id"]]
        expect = np.zeros_like(lab)
        for a in d["annotations"]:
            for p in a["parts"]:
                expect[decode_rle(p["segmentation"])] = p["category_id"] + 1
        # The world annotates every object pixel, so no pixel is IGNORE and the maps agree everywhere.
        np.testing.assert_array_equal(lab, expect)


def test_probe_loads_backbone_weights_from_a_full_model_checkpoint(world):
    """PARTICLE's checkpoint {"model": {"backbone.<name>": tensor}} reaches the probed backbone."""
    opts = ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.NAME", "build_efficientnet_lite_backbone",
            "MODEL.EFFICIENTNET.PRETRAINED", "False", "MODEL.EFFICIENTNET.OUT_FEATURES", "['res3', 'res4', 'res5']",
            "MODEL.PIXEL_MEAN", "[127.5, 127.5, 127.5]", "MODEL.PIXEL_STD", "[127.5, 127.5, 127.5]",
            "INPUT.FORMAT", "RGB", "PROBE.LINEAR.LEVELS", "['res3', 'res4']"]
    torch.manual_seed(0)
    dense, pooled = build_probe_extractors(build_cfg("", opts))
    assert pooled.levels == ["res5"] and pooled.backbone is dense.backbone
    state = {k: v + 0.5 if v.is_floating_point() else v for k, v in dense.backbone.state_dict().items()}
    path = str(world.mktemp("ckpt") / "model_final.pth")
    torch.save({"model": {"backbone." + k: v for k, v in state.items()}}, path)
    torch.manual_seed(1)
    loaded, _ = build_probe_extractors(build_cfg("", opts + ["MODEL.WEIGHTS", path]))
    for k, v in loaded.backbone.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_weights_specs_are_parsed_and_missing_files_named(tmp_path):
    from part_distill.probes.cli import parse_weights

    ckpt = tmp_path / "lr=0.1" / "model_final.pth"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    assert parse_weights(["ImageNet=", f"PARTICLE 1={ckpt}", str(ckpt)]) == [
        ("ImageNet", ""), ("PARTICLE 1", str(ckpt)), (None, str(ckpt))]
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        parse_weights([f"x={tmp_path / 'nope.pth'}"])
