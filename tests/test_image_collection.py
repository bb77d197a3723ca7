"""Unlabeled image collections: an ImageNet-layout folder of real photos (scikit-image) + Detic-format
COCO-results shards -> dataset dicts (compared with hand-built ones) -> a mined part store."""
import json
import os

import numpy as np
import torch
import pytest
from PIL import Image
from pycocotools import mask as mask_util

import part_distill  # noqa: F401  (registers datasets)
from detectron2.data import DatasetCatalog, MetadataCatalog
from part_distill.data.datasets import detection_results
from part_distill.data.datasets.detection_results import INDEX_SUFFIX, iter_json_rows, load_results_index
from part_distill.data.datasets.image_collection import (
    build_image_collection, list_image_folder, load_vocabulary, register_image_collection)
from part_distill.engine.part_labels import _gt_objects
from part_distill.engine.setup import build_cfg
from part_distill.mining.miner import mine_parts

skdata = pytest.importorskip("skimage.data")

# (relative path, photo, (height, width)): sorted order gives ids 1..4.
IMAGES = [("n01000001/a.JPEG", "chelsea", (48, 72)), ("n01000001/b.JPEG", "coffee", (40, 60)),
          ("n02000002/c.jpeg", "astronaut", (64, 64)), ("n02000002/d.png", "rocket", (43, 64))]
VOCAB = [{"id": 3, "name": "cat"}, {"id": 7, "name": "cup"}, {"id": 11, "name": "person"}]


def _box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _rle(mask):
    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(r["size"]), "counts": r["counts"].decode("ascii")}


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    img_root = root / "train"
    for rel, photo, (h, w) in IMAGES:
        os.makedirs(img_root / os.path.dirname(rel), exist_ok=True)
        Image.fromarray(getattr(skdata, photo)()).resize((w, h)).save(img_root / rel)
    (img_root / "n02000002" / "notes.txt").write_text("not an image")
    vocab = root / "lvis_categories.json"
    vocab.write_text(json.dumps({"categories": VOCAB}))
    m = {  # masks by (image, object)
        "a_cat": _box(48, 72, 5, 30, 10, 40), "a_cup": _box(48, 72, 30, 46, 50, 70), "a_low": _box(48, 72, 0, 9, 0, 9),
        "b_cup": _box(40, 60, 8, 36, 12, 50), "b_empty": np.zeros((40, 60), bool),
        "c_p1": _box(64, 64, 4, 60, 10, 30), "c_p2": _box(64, 64, 4, 60, 32, 62), "c_p3": _box(64, 64, 0, 20, 0, 64),
        "d_low": _box(43, 64, 10, 30, 10, 30),
    }
    # Shard 1: a JSON array keyed by file_name (relative, absolute, a non-ASCII name matching nothing).
    # Image 1 keeps its two best rows above 0.5 (0.9, 0.7; not 0.6), image 2 its non-empty mask.
    shard1 = [
        {"file_name": "n01000001/a.JPEG", "category_id": 7, "segmentation": _rle(m["a_cup"]), "score": 0.6},
        {"file_name": "n01000001/a.JPEG", "category_id": 3, "segmentation": _rle(m["a_cat"]), "score": 0.9},
        {"file_name": "n01000001/a.JPEG", "category_id": 3, "segmentation": _rle(m["a_low"]), "score": 0.3},
        {"file_name": str(img_root / "n01000001/b.JPEG"), "category_id": 7, "segmentation": _rle(m["b_cup"]),
         "score": 0.8},
        {"file_name": "n01000001/b.JPEG", "category_id": 7, "segmentation": _rle(m["b_empty"]), "score": 0.95},
        {"file_name": "n09/\u00fcber.JPEG", "category_id": 3, "segmentation": _rle(m["a_cat"]), "score": 0.99},
        # A file_name from another machine that matches nothing: matched by its image_id (1 = a.JPEG).
        {"file_name": "/elsewhere/renamed.JPEG", "image_id": 1, "category_id": 7, "segmentation": _rle(m["a_low"]),
         "score": 0.7},
    ]
    # Shard 2: JSON Lines keyed by image_id (the folder rule), one row for an unknown id.
    shard2 = [
        {"image_id": 3, "category_id": 11, "segmentation": _rle(m["c_p1"]), "score": 0.7},
        {"image_id": 3, "category_id": 11, "segmentation": _rle(m["c_p2"]), "score": 0.75},
        {"image_id": 3, "category_id": 11, "segmentation": _rle(m["c_p3"]), "score": 0.55},
        {"image_id": 4, "category_id": 11, "segmentation": _rle(m["d_low"]), "score": 0.2},
        {"image_id": 99, "category_id": 11, "segmentation": _rle(m["d_low"]), "score": 0.9},
    ]
    det = root / "detic"
    det.mkdir()
    with open(det / "results_00.json", "w", encoding="utf-8") as f:
        json.dump(shard1, f, ensure_ascii=False, indent=1)
    with open(det / "results_01.json", "w") as f:
        f.write("\n".join(json.dumps(r) for r in shard2) + "\n")
    expected = [  # hand-built: score >= 0.5, top 2 per image, best first, empty mask and image 4 dropped
        {"image_id": 1, "file_name": str(img_root / "n01000001/a.JPEG"), "height": 48, "width": 72,
         "objects": [(0, m["a_cat"], 0.9), (1, m["a_low"], 0.7)]},
        {"image_id": 2, "file_name": str(img_root / "n01000001/b.JPEG"), "height": 40, "width": 60,
         "objects": [(1, m["b_cup"], 0.8)]},
        {"image_id": 3, "file_name": str(img_root / "n02000002/c.jpeg"), "height": 64, "width": 64,
         "objects": [(2, m["c_p2"], 0.75), (2, m["c_p1"], 0.7)]},
    ]
    return {"root": root, "img_root": str(img_root), "vocab": str(vocab), "shards": [str(det / "results_0*.json")],
            "files": [str(det / "results_00.json"), str(det / "results_01.json")], "expected": expected,
            "rows": shard1 + shard2}


def _check(dicts, expected):
    assert [d["image_id"] for d in dicts] == [e["image_id"] for e in expected]
    ids = []
    for d, e in zip(dicts, expected):
        assert (d["file_name"], d["height"], d["width"]) == (e["file_name"], e["height"], e["width"])
        assert len(d["annotations"]) == len(e["objects"])
        for a, (cat, mask, score) in zip(d["annotations"], e["objects"]):
            assert a["category_id"] == cat and a["score"] == score and a["iscrowd"] == 0
            seg = dict(a["segmentation"], counts=a["segmentation"]["counts"].encode("ascii"))
            np.testing.assert_array_equal(mask_util.decode(seg).astype(bool), mask)
            ys, xs = np.nonzero(mask)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            ids.append(a["id"])
    assert ids == list(range(1, len(ids) + 1))


def test_folder_ids_follow_sorted_relative_paths(collection):
    assert list_image_folder(collection["img_root"]) == [rel for rel, _, _ in IMAGES]


def test_vocabulary_formats(tmp_path):
    lvis = tmp_path / "v.json"
    lvis.write_text(json.dumps([{"id": 11, "name": "b"}, {"id": 2, "name": "a"}]))
    assert load_vocabulary(str(lvis)) == (["a", "b"], {2: 0, 11: 1})
    plain = tmp_path / "wnids.txt"
    plain.write_text("n01440764\n\nn01443537\n")
    assert load_vocabulary(str(plain)) == (["n01440764", "n01443537"], {0: 0, 1: 1})


def test_collection_dicts_match_hand_built(collection):
    dicts, counts = build_image_collection(collection["img_root"], collection["shards"], collection["vocab"],
                                           score_thresh=0.5, topn=2)
    _check(dicts, collection["expected"])
    assert counts == {"images": 4, "images_kept": 3, "images_without_objects": 1, "result_rows": 12,
                      "result_rows_unmatched": 2, "objects_empty_mask": 1}
    # The stages' GT-object readers (mining "gt" source, self-training / ranking labelling) see the same objects.
    objs = _gt_objects(dicts[2])
    assert [o.category_id for o in objs] == [2, 2]
    np.testing.assert_array_equal(objs[0].mask, collection["expected"][2]["objects"][0][1])


def test_streaming_reader_and_cached_index(collection, monkeypatch):
    rows = []
    for path in collection["files"]:
        with open(path, "rb") as f:
            data = f.read()
        got = list(iter_json_rows(path, chunk_bytes=7))  # rows straddle many chunks
        for off, length, row in got:
            assert json.loads(data[off:off + length].decode("utf-8")) == row
        rows += [json.loads(data[o:o + n].decode("utf-8")) for o, n, _ in got]
        assert os.path.exists(path + INDEX_SUFFIX)  # written by the previous test
    assert rows == collection["rows"]
    ix = load_results_index(collection["files"][0])
    assert "n09/\u00fcber.JPEG" in list(ix["names"])

    def no_stream(*a, **k):
        raise AssertionError("results file streamed again although its index is cached")

    monkeypatch.setattr(detection_results, "iter_json_rows", no_stream)
    dicts, _ = build_image_collection(collection["img_root"], collection["shards"], collection["vocab"],
                                      score_thresh=0.5, topn=2)
    _check(dicts, collection["expected"])
    # A changed file invalidates its index.
    st = os.stat(collection["files"][1])
    os.utime(collection["files"][1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="streamed again"):
        load_results_index(collection["files"][1])


def test_coco_image_list_and_bad_inputs(collection, tmp_path):
    images = {"images": [{"id": 3, "file_name": "n02000002/c.jpeg", "height": 64, "width": 64},
                         {"id": 1, "file_name": "n01000001/a.JPEG", "height": 48, "width": 72}]}
    listing = tmp_path / "images.json"
    listing.write_text(json.dumps(images))
    dicts, counts = build_image_collection(collection["img_root"], collection["shards"], collection["vocab"],
                                           images_json=str(listing), score_thresh=0.5, topn=1)
    exp = [dict(collection["expected"][2], objects=collection["expected"][2]["objects"][:1]),
           dict(collection["expected"][0], objects=collection["expected"][0]["objects"][:1])]
    _check(dicts, exp)
    assert counts["images_without_objects"] == 0
    with pytest.raises(FileNotFoundError, match="missing_.*matches no file"):
        build_image_collection(collection["img_root"], [str(tmp_path / "missing_*.json")], collection["vocab"])
    small = tmp_path / "vocab.json"
    small.write_text(json.dumps([{"id": 3, "name": "cat"}]))
    with pytest.raises(ValueError, match="category_id 7 is not in the vocabulary"):
        build_image_collection(collection["img_root"], collection["shards"], str(small))


def test_config_registration_and_mining(collection, tmp_path):
    opts = ["DATASETS.IMAGE_COLLECTION.NAME", "test_collection", "DATASETS.IMAGE_COLLECTION.IMAGE_ROOT",
            collection["img_root"], "DATASETS.IMAGE_COLLECTION.OBJECTS", str(collection["shards"]),
            "DATASETS.IMAGE_COLLECTION.VOCABULARY", collection["vocab"], "DATASETS.IMAGE_COLLECTION.TOPN", "2",
            "MODEL.DEVICE", "cpu", "MINING.FEATURES", "rgbxy", "MINING.IMAGE_SIZE", "64", "MINING.SHARD_SIZE", "2",
            "MINING.BATCH_SIZE", "2", "MINING.MAX_ITER", "20", "MINING.DATASETS", '("test_collection",)',
            "MINING.OUTPUT_DIR", str(tmp_path / "store")]
    cfg = build_cfg("", opts)
    assert MetadataCatalog.get("test_collection").thing_classes == ["cat", "cup", "person"]
    _check(DatasetCatalog.get("test_collection"), collection["expected"])
    manifest = mine_parts(cfg)
    assert manifest["counts"]["images"] == 3
    objects = []
    for shard in sorted(os.listdir(tmp_path / "store" / "shards")):
        with open(tmp_path / "store" / "shards" / shard) as f:
            s = json.load(f)
        objects += [(im["source_image_id"], o["category_id"]) for im in s["images"] for o in s["objects"]
                    if o["image_id"] == im["id"]]
    assert objects == [(1, 0), (1, 1), (2, 1), (3, 2), (3, 2)]
    # Every object got parts inside its mask.
    assert manifest["counts"]["parts"] >= 5 * 2
    register_image_collection("test_collection_again", collection["img_root"], collection["shards"],
                              collection["vocab"], score_thresh=0.95)
    assert DatasetCatalog.get("test_collection_again") == []


def test_paper_mining_config_runs_on_the_collection(collection, tmp_path):
    """configs/imagenet/mine_parts_R50.yaml as shipped (res3+res4, cosine k=4, dense CRF) on the collection,
    at a tiny backbone and without weights; only paths and sizes are overridden."""
    pytest.importorskip("pydensecrf")
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "imagenet", "mine_parts_R50.yaml")
    cfg = build_cfg(path, [
        "DATASETS.IMAGE_COLLECTION.IMAGE_ROOT", collection["img_root"],
        "DATASETS.IMAGE_COLLECTION.OBJECTS", str(collection["shards"]),
        "DATASETS.IMAGE_COLLECTION.VOCABULARY", collection["vocab"], "DATASETS.IMAGE_COLLECTION.TOPN", "2",
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18",
        "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "MINING.IMAGE_SIZE", "96", "MINING.CRF.NUM_WORKERS", "0", "MINING.OUTPUT_DIR", str(tmp_path / "store")])
    assert (cfg.MINING.NUM_CLUSTERS, cfg.MINING.METRIC, cfg.MINING.CRF.ENABLED) == (4, "cosine", True)
    manifest = mine_parts(cfg)
    counts = manifest["counts"]
    assert (counts["images"], counts["instances"]) == (3, 5)
    # k=4 per object unless k-means left a cluster empty or an instance was skipped (counted).
    assert counts["parts"] + 4 * sum(counts["instances_skipped"].values()) >= 5 * 2


def test_paper_configs_chain_on_the_collection(collection, tmp_path):
    """configs/imagenet/{mine_parts_R50, proposal, self_train, ranking, distill}.yaml in sequence on the
    collection, each at a tiny model size for two iterations: every stage takes its objects from it."""
    from part_distill.engine.stages import run_stage

    cfg_dir = os.path.join(os.path.dirname(__file__), "..", "configs", "imagenet")
    data = ["DATASETS.IMAGE_COLLECTION.IMAGE_ROOT", collection["img_root"],
            "DATASETS.IMAGE_COLLECTION.OBJECTS", str(collection["shards"]),
            "DATASETS.IMAGE_COLLECTION.VOCABULARY", collection["vocab"], "DATASETS.IMAGE_COLLECTION.TOPN", "2",
            "MODEL.DEVICE", "cpu"]
    mined = build_cfg(os.path.join(cfg_dir, "mine_parts_R50.yaml"), data + [
        "MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "MINING.IMAGE_SIZE", "96", "MINING.CRF.NUM_WORKERS", "0", "MINING.OUTPUT_DIR", str(tmp_path / "mined")])
    mine_parts(mined)
    tiny = data + [
        "MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.DEPTHS", "[1, 1, 1, 1]", "MODEL.SWIN.NUM_HEADS", "[1, 1, 1, 1]",
        "MODEL.SWIN.WINDOW_SIZE", "4", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
        "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1", "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_DIM_FEEDFORWARD", "32",
        "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.NHEADS", "2",
        "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "32",
        "MODEL.MASK_FORMER.DEC_LAYERS", "2", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "4",
        "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "64", "MODEL.PART_DISTILL.NUM_PART_QUERIES", "6",
        "MODEL.PART_DISTILL.PART_DEC_LAYERS", "2", "MODEL.PART_DISTILL.OBJECT_CROP.SIZE", "64",
        "INPUT.IMAGE_SIZE", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.AMP.ENABLED", "False",
        "DATALOADER.NUM_WORKERS", "0", "PART_DISTILL.FIT.NUM_IMAGES", "0",
        "PART_DISTILL.SELF_TRAIN.ITERS_PER_ROUND", "2", "PART_DISTILL.SELF_TRAIN.SHARD_SIZE", "2",
        "PART_DISTILL.SELF_TRAIN.BATCH_SIZE", "2",
        # A random-weight model scores every query low: keep them all as labels / candidates.
        "PART_DISTILL.SELF_TRAIN.SCORE_THRESH", "0.0", "PART_DISTILL.SELF_TRAIN.MIN_AREA_RATIO", "0.0",
        "PART_DISTILL.RANKING.MIN_CANDIDATES", "1", "DATASETS.PSEUDO_LABELS.MIN_PART_AREA_RATIO", "0.0"]
    out = tmp_path / "out"
    weights = {"proposal": "", "self_train": out / "proposal" / "model_final.pth",
               "ranking": out / "self_train" / "round_0" / "model_final.pth",
               "distill": out / "ranking" / "model_final.pth"}
    for stage, w in weights.items():
        cfg = build_cfg(os.path.join(cfg_dir, f"{stage}.yaml"), tiny + [
            "MODEL.WEIGHTS", str(w), "OUTPUT_DIR", str(out / stage),
            "PART_DISTILL.PSEUDO_LABELS.MANIFEST", str(tmp_path / "mined" / "manifest.json")])
        assert cfg.MODEL.PART_DISTILL.NUM_OBJECT_CLASSES == 3
        run_stage(cfg)
    for stage in ("self_train", "distill"):
        with open(out / stage / "round_0" / "round.json") as f:
            labels = json.load(f)["labels"]["counts"]
        # The teacher labelled the collection's 3 images and their 5 Detic objects.
        assert (labels["images"], labels["instances"]) == (3, 5) and labels["parts"] > 0, stage
    assert (out / "distill" / "round_0" / "model_final.pth").exists()
    ranked = torch.load(out / "ranking" / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    # Prototypes for the vocabulary's 3 classes; "cat" (0) and "person" (2) own objects in the collection.
    assert tuple(ranked["ranker.prototypes"].shape[:2]) == (3, 8)
    assert ranked["ranker.prototype_valid"].any(dim=1)[[0, 2]].all()
