"""The synthetic parts world: determinism, mask consistency, COCO validity, registration, regeneration."""
import contextlib
import io
import json
import os
import threading
import types
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode

from part_distill.config import add_part_distill_config
from part_distill.data import parts_world as pw
from part_distill.data.contact_sheet import draw_contact_sheet, palette
from part_distill.data.datasets import parts_world as reg
from part_distill.utils.masks import decode_rle

SMALL = pw.WorldSettings(seed=0, num_train=8, num_val=8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pw") / "world"
    root.mkdir()
    pw.generate_parts_world(str(root), SMALL)
    return root


def _load(root, split):
    with open(root / f"instances_{split}.json") as f:
        inst = json.load(f)
    with open(root / f"parts_{split}.json") as f:
        parts = json.load(f)
    return inst, parts


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture
def default_registration():
    yield
    reg.register_parts_world()  # leave the catalogs as importing part_distill made them


def test_same_seed_gives_byte_identical_world(world, tmp_path):
    again = tmp_path / "again"
    again.mkdir()
    pw.generate_parts_world(str(again), SMALL)
    a, b = _files(world), _files(again)
    assert sorted(a) == sorted(b)
    assert len([k for k in a if k.endswith(".png")]) == 16
    assert all(a[k] == b[k] for k in a)

    other = tmp_path / "other"
    other.mkdir()
    pw.generate_parts_world(str(other), pw.WorldSettings(seed=1, num_train=8, num_val=8))
    c = _files(other)
    assert a["images/val/000000.png"] != c["images/val/000000.png"]
    assert a["parts_val.json"] != c["parts_val.json"]

    # val depends on the seed only, not on how many train images were asked for
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    pw.generate_parts_world(str(fewer), pw.WorldSettings(seed=0, num_train=3, num_val=8))
    d = _files(fewer)
    assert all(d[k] == a[k] for k in a if "val" in k)


@pytest.mark.parametrize("split", pw.SPLITS)
def test_parts_partition_their_object(world, split):
    inst, parts = _load(world, split)
    by_object = defaultdict(list)
    for p in parts["annotations"]:
        by_object[p["object_id"]].append(p)
    assert set(by_object) == {o["id"] for o in inst["annotations"]}
    for obj in inst["annotations"]:
        omask = decode_rle(obj["segmentation"])
        union = np.zeros_like(omask)
        cover = np.zeros(omask.shape, np.int32)
        for p in by_object[obj["id"]]:
            pmask = decode_rle(p["segmentation"])
            assert p["image_id"] == obj["image_id"]
            assert not (pmask & ~omask).any(), "part outside its object"
            assert pmask.sum() >= SMALL.min_part_pixels
            union |= pmask
            cover += pmask
        assert np.array_equal(union, omask), "object is not the union of its parts"
        assert cover.max() == 1, "parts of one object overlap"
    # objects of one image are disjoint (occlusion resolved to visible pixels)
    per_image = defaultdict(list)
    for obj in inst["annotations"]:
        per_image[obj["image_id"]].append(decode_rle(obj["segmentation"]).astype(np.int32))
    for masks in per_image.values():
        assert np.sum(masks, axis=0).max() == 1


@pytest.mark.parametrize("kind", ["instances", "parts"])
def test_boxes_areas_and_rle_agree_with_pycocotools(world, kind):
    with open(world / f"{kind}_val.json") as f:
        data = json.load(f)
    for a in data["annotations"]:
        assert isinstance(a["segmentation"]["counts"], str)
        assert a["iscrowd"] == 0
        rle = {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
        assert a["area"] == int(mask_util.area(rle))
        np.testing.assert_allclose(a["bbox"], mask_util.toBbox(rle))
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])


def test_counts_within_requested_ranges(world):
    for split in pw.SPLITS:
        inst, parts = _load(world, split)
        assert len(inst["images"]) == SMALL.num_images(split)
        per_image = Counter(a["image_id"] for a in inst["annotations"])
        assert all(1 <= per_image[im["id"]] <= SMALL.max_objects for im in inst["images"])
        per_object = Counter(p["object_id"] for p in parts["annotations"])
        assert all(2 <= n <= 6 for n in per_object.values())
        cls_of = {o["id"]: pw.OBJECT_CLASSES[o["category_id"] - 1] for o in inst["annotations"]}
        for p in parts["annotations"]:
            assert pw.PART_CLASSES[p["category_id"] - 1] in pw.OBJECT_PARTS[cls_of[p["object_id"]]]
        for im in inst["images"]:
            img = cv2.imread(str(world / "images" / split / im["file_name"]))
            assert img.shape == (im["height"], im["width"], 3) == (192, 192, 3)


def test_layouts_have_three_to_six_parts_before_occlusion():
    rng = np.random.default_rng(0)
    for name, layout in pw._LAYOUTS.items():
        for _ in range(30):
            parts = layout(rng, lambda: rng.uniform(0.88, 1.12))
            assert 3 <= len(parts) <= 6, name
            assert {p for p, _ in parts} <= set(pw.OBJECT_PARTS[name])
    assert len(pw.OBJECT_CLASSES) >= 6


def test_shared_part_types_occur_on_several_classes(world):
    inst, parts = _load(world, "train")
    cls_of = {o["id"]: o["category_id"] for o in inst["annotations"]}
    classes_per_part = defaultdict(set)
    for p in parts["annotations"]:
        classes_per_part[p["category_id"]].add(cls_of[p["object_id"]])
    assert sum(len(c) >= 2 for c in classes_per_part.values()) >= 2
    # the declared users of each part category match the class -> parts table
    for cat in parts["categories"]:
        users = [c for c in pw.OBJECT_CLASSES if cat["name"] in pw.OBJECT_PARTS[c]]
        assert cat["object_classes"] == users
        assert (cat["supercategory"] == "shared") == (len(users) > 1)


def test_part_colour_varies_across_instances(world):
    """The same part type gets unrelated textures, so its mean colour is not a class cue."""
    inst, parts = _load(world, "train")
    files = {im["id"]: im["file_name"] for im in inst["images"]}
    means = defaultdict(list)
    for p in parts["annotations"]:
        img = cv2.imread(str(world / "images" / "train" / files[p["image_id"]])).astype(np.float64)
        means[p["category_id"]].append(img[decode_rle(p["segmentation"])].mean(0))
    common = [np.array(m) for m in means.values() if len(m) >= 6]
    assert common
    for m in common:
        assert m.std(0).mean() > 15


def test_jsons_load_with_pycocotools_and_detectron2(world):
    for split in pw.SPLITS:
        with contextlib.redirect_stdout(io.StringIO()):
            inst = COCO(str(world / f"instances_{split}.json"))
            parts = COCO(str(world / f"parts_{split}.json"))
        assert len(inst.getImgIds()) == SMALL.num_images(split)
        assert [c["name"] for c in inst.loadCats(inst.getCatIds())] == list(pw.OBJECT_CLASSES)
        assert [c["name"] for c in parts.loadCats(parts.getCatIds())] == list(pw.PART_CLASSES)
        dicts = load_coco_json(str(world / f"instances_{split}.json"), str(world / "images" / split))
        assert len(dicts) == SMALL.num_images(split)
        assert sum(len(d["annotations"]) for d in dicts) == len(inst.getAnnIds())
        assert all(os.path.isfile(d["file_name"]) for d in dicts)


def test_registration_gives_documented_format(tmp_path, monkeypatch, default_registration):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    reg.register_parts_world(SMALL)
    plain = DatasetCatalog.get("parts_world_val")
    dicts = DatasetCatalog.get("parts_world_val_parts")
    world = tmp_path / "parts_world" / SMALL.key
    assert (world / "world.json").is_file()
    meta = MetadataCatalog.get("parts_world_val_parts")
    assert meta.thing_classes == list(pw.OBJECT_CLASSES)
    assert meta.part_classes == list(pw.PART_CLASSES)
    assert meta.evaluator_type == "parts"
    assert MetadataCatalog.get("parts_world_val").evaluator_type == "coco"
    assert meta.object_part_classes[pw.OBJECT_CLASSES.index("car")] == [
        pw.PART_CLASSES.index(p) for p in ("body", "window", "wheel")]
    with open(world / "parts_val.json") as f:
        part_json = {p["id"]: p for p in json.load(f)["annotations"]}
    assert len(dicts) == len(plain) == SMALL.num_val
    seen_objects = set()
    for d, p in zip(dicts, plain):
        assert {"file_name", "height", "width", "image_id", "annotations"} <= set(d)
        assert os.path.isfile(d["file_name"])
        assert all("parts" not in a for a in p["annotations"])
        for a in d["annotations"]:
            assert a["bbox_mode"] == BoxMode.XYWH_ABS and a["iscrowd"] == 0
            assert 0 <= a["category_id"] < len(meta.thing_classes)
            assert isinstance(a["segmentation"]["counts"], str)
            assert a["id"] not in seen_objects
            seen_objects.add(a["id"])
            omask = decode_rle(a["segmentation"])
            assert a["parts"]
            for part in a["parts"]:
                assert set(part) == {"category_id", "segmentation", "id"}
                assert part["category_id"] in meta.object_part_classes[a["category_id"]]
                # contiguous id <-> json category id, and the part belongs to this object
                assert part_json[part["id"]]["category_id"] == part["category_id"] + 1
                assert part_json[part["id"]]["object_id"] == a["id"]
                assert not (decode_rle(part["segmentation"]) & ~omask).any()
    train = DatasetCatalog.get("parts_world_train_parts")
    assert len(train) == SMALL.num_train and all("parts" in a for d in train for a in d["annotations"])


def test_register_from_config_uses_config_settings(tmp_path, monkeypatch, default_registration):
    cfg = add_part_distill_config(get_cfg())
    assert pw.WorldSettings.from_config(cfg) == pw.WorldSettings()  # one set of defaults
    cfg.PARTS_WORLD.NUM_TRAIN, cfg.PARTS_WORLD.NUM_VAL, cfg.PARTS_WORLD.SEED = 4, 3, 5
    cfg.PARTS_WORLD.ROOT = str(tmp_path / "elsewhere")
    reg.register_parts_world_from_config(cfg)
    assert len(DatasetCatalog.get("parts_world_val")) == 3
    key = pw.WorldSettings.from_config(cfg).key
    assert pw.read_manifest(str(tmp_path / "elsewhere" / key))["settings"]["seed"] == 5


def test_other_settings_get_their_own_folder_and_nothing_is_rewritten(tmp_path, monkeypatch):
    calls = []
    real = pw.generate_parts_world
    monkeypatch.setattr(pw, "generate_parts_world", lambda root, s: calls.append(s) or real(root, s))
    base = str(tmp_path / "parts_world")
    root = pw.ensure_parts_world(base, SMALL)
    assert root == os.path.join(base, SMALL.key)
    first = _files(root)
    assert pw.ensure_parts_world(base, SMALL) == root and len(calls) == 1
    other = pw.WorldSettings(seed=3, num_train=5, num_val=4)
    other_root = pw.ensure_parts_world(base, other)
    assert len(calls) == 2 and other_root == os.path.join(base, other.key) != root
    assert pw.read_manifest(other_root)["settings"]["seed"] == 3
    assert len(os.listdir(os.path.join(other_root, "images", "train"))) == 5
    assert _files(root) == first  # the first world is untouched
    assert _files(other_root)["images/val/000000.png"] != first["images/val/000000.png"]
    # a damaged world is reported, not silently regenerated under the work made from it
    os.remove(os.path.join(root, "parts_val.json"))
    with pytest.raises(RuntimeError, match="parts_val.json missing.*never rewritten"):
        pw.ensure_parts_world(base, SMALL)
    assert len(calls) == 2
    assert not [n for n in os.listdir(base) if "-tmp-" in n]  # no temp leftovers


def test_defaults_are_the_config_defaults():
    cfg = add_part_distill_config(get_cfg())
    w = cfg.PARTS_WORLD
    d = pw.WorldSettings()
    assert (d.seed, d.num_train, d.num_val, d.image_size, d.max_objects, d.min_part_pixels) == (
        w.SEED, w.NUM_TRAIN, w.NUM_VAL, w.IMAGE_SIZE, w.MAX_OBJECTS, w.MIN_PART_PIXELS)
    assert d.key == pw.config_hash(d.as_dict()) and SMALL.key != d.key


def test_concurrent_callers_generate_once(tmp_path, monkeypatch):
    calls = []
    real = pw.generate_parts_world
    monkeypatch.setattr(pw, "generate_parts_world", lambda root, s: calls.append(s) or real(root, s))
    base = str(tmp_path / "parts_world")
    results = []
    threads = [threading.Thread(target=lambda: results.append(pw.ensure_parts_world(base, SMALL)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3
    assert pw.world_status(results[0], SMALL) is None


def test_foreign_directory_is_not_overwritten(tmp_path):
    root = tmp_path / "parts_world" / SMALL.key
    root.mkdir(parents=True)
    (root / "precious.txt").write_text("not ours")
    with pytest.raises(RuntimeError, match="DETECTRON2_DATASETS"):
        pw.ensure_parts_world(str(tmp_path / "parts_world"), SMALL)
    assert (root / "precious.txt").read_text() == "not ours"


def test_contact_sheet_paints_parts_in_their_colours(world):
    records = reg.load_parts_world(str(world), "val", with_parts=True)
    meta = types.SimpleNamespace(**reg.parts_world_metadata())
    sheet = draw_contact_sheet(records, meta, num_images=1, columns=1, panel_size=192)
    rec = records[0]
    img = cv2.imread(rec["file_name"]).astype(np.float32)
    tile_y, tile_x = 30 + 10 + 18, 10  # header, pad, caption
    part_panel = sheet[tile_y:tile_y + 192, tile_x + 2 * 192 + 4:tile_x + 3 * 192 + 4]
    colours = palette(len(meta.part_classes), offset=0.31)
    checked = 0
    for ann in rec["annotations"]:
        for p in ann["parts"]:
            m = cv2.erode(decode_rle(p["segmentation"]).astype(np.uint8), np.ones((5, 5), np.uint8),
                          borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)
            if not m.any():  # thin part: all of it is outline
                continue
            expected = (0.35 * img[m] + 0.65 * np.array(colours[p["category_id"]], np.float32)).astype(np.uint8)
            assert np.abs(part_panel[m].astype(int) - expected).max() <= 1
            checked += m.sum()
    assert checked > 100
