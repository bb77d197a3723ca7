"""Real part datasets: Pascal-Part on the two real samples, PartImageNet and Cityscapes-Panoptic-Parts on
tiny files written in their exact release formats, plus registration and missing-root errors."""
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from pycocotools import mask as mask_util

import part_distill  # noqa: F401  (registers the datasets)
from part_distill.data.datasets import builtin_real
from part_distill.data.datasets.cityscapes_parts import (
    CITYSCAPES_PARTS, cityscapes_parts_vocabulary, decode_uids, load_cityscapes_parts,
)
from part_distill.data.datasets.partimagenet import PARTIMAGENET_OBJECTS, PARTIMAGENET_PARTS, load_partimagenet
from part_distill.data.datasets.pascal_part import (
    COARSE_PARTS, FINE_PARTS, VOC_CLASSES, base_part_name, load_pascal_part, pascal_part_vocabulary,
)
from part_distill.data.datasets.real_common import DatasetNotFoundError
from part_distill.utils.masks import decode_rle

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "pascal_part_samples"
needs_samples = pytest.mark.skipif(not (SAMPLES / "Annotations").is_dir(),
                                   reason="../shared Pascal-Part samples absent")


def _check_parts_inside_objects(dicts):
    for d in dicts:
        for a in d["annotations"]:
            obj = decode_rle(a["segmentation"])
            assert obj.shape == (d["height"], d["width"]) and obj.any()
            x, y, w, h = a["bbox"]
            ys, xs = np.nonzero(obj)
            assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            for p in a.get("parts", ()):
                pm = decode_rle(p["segmentation"])
                assert pm.any() and not (pm & ~obj).any()


# ------------------------------------------------------------------------------------------- Pascal-Part
def _raw_objects(name):
    """Straight from scipy: [(class, mask, {part name: mask})] as stored in the .mat."""
    anno = scipy.io.loadmat(SAMPLES / "Annotations" / f"{name}.mat")["anno"][0, 0]
    out = []
    for o in anno["objects"][0]:
        parts = {str(p["part_name"][0]): p["mask"].astype(bool) for p in (o["parts"][0] if o["parts"].size else [])}
        out.append((str(o["class"][0]), o["mask"].astype(bool), parts))
    return out


@needs_samples
def test_pascal_part_real_samples_objects_and_fine_parts():
    names = ["2008_000008", "2008_000009"]
    dicts = load_pascal_part(str(SAMPLES / "JPEGImages"), str(SAMPLES / "Annotations"), names, parts="fine")
    part_classes = pascal_part_vocabulary("fine")[0]
    assert [d["image_id"] for d in dicts] == [2008000008, 2008000009]
    assert [(d["height"], d["width"]) for d in dicts] == [(442, 500), (375, 500)]
    for d in dicts:  # sizes agree with the JPEG files themselves
        with Image.open(d["file_name"]) as im:
            assert im.size == (d["width"], d["height"])
    classes = [[VOC_CLASSES[a["category_id"]] for a in d["annotations"]] for d in dicts]
    assert classes == [["person", "horse"], ["cow", "cow"]]
    person = dicts[0]["annotations"][0]
    assert sorted(part_classes[p["category_id"]] for p in person["parts"]) == sorted(
        "person_" + n for n in ["head", "lear", "leye", "lebrow", "mouth", "hair", "nose", "torso", "neck",
                                "llarm", "luarm", "llleg", "luleg", "ruleg"])
    assert [len(a["parts"]) for d in dicts for a in d["annotations"]] == [14, 13, 13, 8]
    # Masks are exactly the stored ones.
    for d, name in zip(dicts, names):
        for a, (cls, mask, parts) in zip(d["annotations"], _raw_objects(name)):
            np.testing.assert_array_equal(decode_rle(a["segmentation"]), mask)
            got = {part_classes[p["category_id"]]: decode_rle(p["segmentation"]) for p in a["parts"]}
            assert set(got) == {f"{cls}_{n}" for n in parts}
            for n, m in parts.items():
                np.testing.assert_array_equal(got[f"{cls}_{n}"], m)
    _check_parts_inside_objects(dicts)
    ids = [a["id"] for d in dicts for a in d["annotations"]]
    pids = [p["id"] for d in dicts for a in d["annotations"] for p in a["parts"]]
    assert len(set(ids)) == len(ids) == 4 and len(set(pids)) == len(pids) == 48


@needs_samples
def test_pascal_part_real_samples_coarse_parts_are_unions():
    names = ["2008_000008", "2008_000009"]
    dicts = load_pascal_part(str(SAMPLES / "JPEGImages"), str(SAMPLES / "Annotations"), names, parts="coarse")
    part_classes = pascal_part_vocabulary("coarse")[0]
    for d, name in zip(dicts, names):
        for a, (cls, _, parts) in zip(d["annotations"], _raw_objects(name)):
            got = {part_classes[p["category_id"]]: decode_rle(p["segmentation"]) for p in a["parts"]}
            expected = {}
            for coarse, fines in COARSE_PARTS[cls].items():
                members = [m for n, m in parts.items() if base_part_name(n) in fines]
                if members:
                    expected[f"{cls}_{coarse}"] = np.logical_or.reduce(members)
            assert set(got) == set(expected)
            for k in expected:
                np.testing.assert_array_equal(got[k], expected[k])
    person = dicts[0]["annotations"][0]
    assert sorted(part_classes[p["category_id"]] for p in person["parts"]) == [
        "person_head", "person_lower_arm", "person_lower_leg", "person_torso", "person_upper_arm", "person_upper_leg"]
    _check_parts_inside_objects(dicts)
    objects_only = load_pascal_part(str(SAMPLES / "JPEGImages"), str(SAMPLES / "Annotations"), names)
    assert all("parts" not in a for d in objects_only for a in d["annotations"])


def test_pascal_part_vocabularies_are_consistent():
    assert len(VOC_CLASSES) == 20 and set(FINE_PARTS) == set(COARSE_PARTS) == set(VOC_CLASSES)
    for cls in VOC_CLASSES:
        merged = [f for fines in COARSE_PARTS[cls].values() for f in fines]
        assert sorted(merged) == sorted(FINE_PARTS[cls]), cls  # every fine part in exactly one coarse part
    for level, n in (("fine", 195), ("coarse", 73)):
        parts, object_parts, fine_to_id = pascal_part_vocabulary(level)
        assert len(parts) == len(set(parts)) == n
        assert sorted(p for ps in object_parts.values() for p in ps) == list(range(n))
        for (cls, _), pid in fine_to_id.items():
            assert pid in object_parts[VOC_CLASSES.index(cls)] and parts[pid].startswith(cls + "_")
    assert base_part_name("wheel_12") == "wheel" and base_part_name("lfuleg") == "lfuleg"


def _write_mat(path, objects, name="2010_000001"):
    """A .mat in the Pascal-Part layout: anno[0,0]['objects'][0] with class/class_ind/mask/parts."""
    objs = np.zeros((1, len(objects)), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")])
    for i, (cls, mask, parts) in enumerate(objects):
        p = np.zeros((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
        for j, (pname, pmask) in enumerate(parts):
            p[0, j]["part_name"] = np.array([pname])
            p[0, j]["mask"] = pmask.astype(np.uint8)
        objs[0, i]["class"] = np.array([cls])
        objs[0, i]["class_ind"] = np.array([[VOC_CLASSES.index(cls) + 1]], np.uint8)
        objs[0, i]["mask"] = mask.astype(np.uint8)
        objs[0, i]["parts"] = p if parts else np.zeros((0, 0))
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0]["imname"] = np.array([name])
    anno[0, 0]["objects"] = objs
    scipy.io.savemat(path, {"anno": anno})


def _box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _pascal_layout(root, h=20, w=30):
    """$DETECTRON2_DATASETS/pascal_part with one crafted image and the val list."""
    base = root / "pascal_part"
    (base / "VOC2010" / "JPEGImages").mkdir(parents=True)
    (base / "VOC2010" / "ImageSets" / "Main").mkdir(parents=True)
    (base / "Annotations_Part").mkdir()
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(base / "VOC2010" / "JPEGImages" / "2010_000001.jpg")
    car = _box(h, w, 2, 12, 2, 20)
    _write_mat(base / "Annotations_Part" / "2010_000001.mat", [
        ("car", car, [("wheel_1", _box(h, w, 8, 12, 2, 6)), ("wheel_2", _box(h, w, 8, 12, 14, 18)),
                      ("window_1", np.zeros((h, w), bool)),             # empty part: dropped, counted
                      ("door_1", _box(h, w, 0, 6, 4, 10)),              # sticks out of the car: clipped
                      ("propeller", _box(h, w, 3, 4, 3, 4))]),          # not a car part: dropped, counted
        ("boat", np.zeros((h, w), bool), []),                           # empty object: dropped, counted
        ("boat", _box(h, w, 14, 18, 22, 28), []),
    ])
    (base / "VOC2010" / "ImageSets" / "Main" / "val.txt").write_text("2010_000001\n2010_000002\n")
    return base


def test_pascal_part_bad_annotations_are_dropped_and_counted(tmp_path, monkeypatch, caplog):
    _pascal_layout(tmp_path)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        fine = DatasetCatalog.get("pascal_part_fine_val_parts")
    assert len(fine) == 1  # 2010_000002 has no .mat
    msg = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for expected in ("pascal_part_fine_val_parts", "image_without_annotation_file: 1", "object_with_empty_mask: 1",
                     "part_with_empty_mask: 1", "unknown_part_name: 1", "part_clipped_to_object: 1"):
        assert expected in msg
    d = fine[0]
    assert [VOC_CLASSES[a["category_id"]] for a in d["annotations"]] == ["car", "boat"]
    assert d["annotations"][1]["parts"] == []
    names = pascal_part_vocabulary("fine")[0]
    car_parts = d["annotations"][0]["parts"]
    assert sorted(names[p["category_id"]] for p in car_parts) == ["car_door", "car_wheel", "car_wheel"]
    door = next(decode_rle(p["segmentation"]) for p in car_parts if names[p["category_id"]] == "car_door")
    np.testing.assert_array_equal(door, _box(20, 30, 2, 6, 4, 10))
    _check_parts_inside_objects(fine)

    coarse = DatasetCatalog.get("pascal_part_val_parts")
    cnames = pascal_part_vocabulary("coarse")[0]
    wheels = [p for p in coarse[0]["annotations"][0]["parts"] if cnames[p["category_id"]] == "car_wheel"]
    assert len(wheels) == 1 and decode_rle(wheels[0]["segmentation"]).sum() == 32  # both wheels, one union
    meta = MetadataCatalog.get("pascal_part_val_parts")
    assert meta.evaluator_type == "parts" and meta.thing_classes == list(VOC_CLASSES)
    assert [cnames[i] for i in meta.object_part_classes[VOC_CLASSES.index("person")]] == [
        "person_head", "person_torso", "person_upper_arm", "person_lower_arm", "person_upper_leg", "person_lower_leg"]
    instances = DatasetCatalog.get("pascal_part_val")
    assert all("parts" not in a for a in instances[0]["annotations"])
    assert MetadataCatalog.get("pascal_part_val").evaluator_type == "coco"


# ------------------------------------------------------------------------------------------- PartImageNet
def _rect_poly(x0, y0, x1, y1):
    return [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]


def _poly_mask(polys, h, w):
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects(polys, h, w))).astype(bool)


def _partimagenet_split(root, split, nested=False):
    """annotations/<split>/<split>.json + images/<split>/ in the release format."""
    cats = [{"id": i, "name": n, "supercategory": n.split(" ")[0]} for i, n in enumerate(PARTIMAGENET_PARTS)]
    images = [
        {"id": 0, "file_name": "n01440764_10029.JPEG", "height": 24, "width": 32},   # a fish
        {"id": 1, "file_name": "n02690373_17.JPEG", "height": 20, "width": 20},      # an aeroplane
        {"id": 2, "file_name": "n02690373_99.JPEG", "height": 16, "width": 16},      # no annotation
    ]
    fish = PARTIMAGENET_PARTS.index
    anns = [
        {"id": 10, "image_id": 0, "category_id": fish("Fish Head"), "segmentation": [_rect_poly(2, 2, 10, 10)],
         "iscrowd": 0, "area": 64, "bbox": [2, 2, 8, 8]},
        {"id": 11, "image_id": 0, "category_id": fish("Fish Body"),
         "segmentation": [_rect_poly(10, 3, 25, 12), _rect_poly(26, 4, 30, 8)], "iscrowd": 0, "area": 0, "bbox": []},
        {"id": 12, "image_id": 0, "category_id": fish("Fish Fin"), "segmentation": [], "iscrowd": 0,
         "area": 0, "bbox": []},                                          # empty: dropped, counted
        {"id": 13, "image_id": 1, "category_id": fish("Aeroplane Wing"), "segmentation": [_rect_poly(1, 1, 18, 5)],
         "iscrowd": 0, "area": 0, "bbox": []},
    ]
    ann_dir = root / "part_imagenet" / "annotations" / split
    ann_dir.mkdir(parents=True)
    (ann_dir / f"{split}.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    img_dir = root / "part_imagenet" / "images" / split
    for im in images:
        folder = img_dir / im["file_name"].split("_")[0] if nested else img_dir
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((im["height"], im["width"], 3), np.uint8)).save(folder / im["file_name"], "JPEG")
    return ann_dir / f"{split}.json", img_dir, anns


@pytest.mark.parametrize("nested", [False, True])
def test_partimagenet_objects_are_part_unions(tmp_path, caplog, nested):
    json_file, img_dir, anns = _partimagenet_split(tmp_path, "val", nested)
    with caplog.at_level(logging.WARNING):
        dicts, (things, parts, object_parts, _) = load_partimagenet(str(json_file), str(img_dir), with_parts=True)
    assert "part_with_empty_mask: 1" in caplog.text
    assert tuple(things) == PARTIMAGENET_OBJECTS and len(things) == 11 and len(parts) == 40
    assert [parts[p] for p in object_parts[things.index("Fish")]] == ["Fish Head", "Fish Body", "Fish Fin", "Fish Tail"]
    assert [d["image_id"] for d in dicts] == [0, 1, 2] and all(os.path.isfile(d["file_name"]) for d in dicts)
    assert [d["synset"] for d in dicts] == ["n01440764", "n02690373", "n02690373"]
    assert [len(d["annotations"]) for d in dicts] == [1, 1, 0]
    fish = dicts[0]["annotations"][0]
    assert things[fish["category_id"]] == "Fish"
    union = _poly_mask(anns[0]["segmentation"] + anns[1]["segmentation"], 24, 32)
    np.testing.assert_array_equal(decode_rle(fish["segmentation"]), union)
    assert [(parts[p["category_id"]], p["id"]) for p in fish["parts"]] == [("Fish Head", 10), ("Fish Body", 11)]
    np.testing.assert_array_equal(decode_rle(fish["parts"][1]["segmentation"]),
                                  _poly_mask(anns[1]["segmentation"], 24, 32))
    assert things[dicts[1]["annotations"][0]["category_id"]] == "Aeroplane"
    _check_parts_inside_objects(dicts)


def test_partimagenet_registered_names(tmp_path, monkeypatch):
    _partimagenet_split(tmp_path, "train")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    inst = DatasetCatalog.get("part_imagenet_train")
    assert len(inst) == 3 and all("parts" not in a for d in inst for a in d["annotations"])
    with_parts = DatasetCatalog.get("part_imagenet_train_parts")
    assert sum(len(a["parts"]) for d in with_parts for a in d["annotations"]) == 3
    meta = MetadataCatalog.get("part_imagenet_train_parts")
    assert meta.part_classes == list(PARTIMAGENET_PARTS) and meta.evaluator_type == "parts"
    assert len(meta.thing_classes) == 11


# ------------------------------------------------------------------------------ Cityscapes-Panoptic-Parts
def _digits_decode(uid):
    """Reference decoding by the digits of the uid's decimal string."""
    s = str(uid)
    if len(s) <= 2:
        return uid, -1, -1
    if len(s) <= 5:
        return int(s[:-3]), int(s[-3:]), -1
    return int(s[:-5]), int(s[-5:-2]), int(s[-2:])


def test_decode_uids_matches_digit_decoding():
    rng = np.random.default_rng(0)
    uids = np.concatenate([np.arange(0, 100), rng.integers(1000, 100_000, 500), rng.integers(100_000, 10_000_000, 500),
                           [2400302, 26000, 2600000, 7, 7001]])
    sid, iid, pid = decode_uids(uids)
    for u, s, i, p in zip(uids, sid, iid, pid):
        assert (s, i, p) == _digits_decode(int(u))
    assert decode_uids(np.array([2400302]))[0][0] == 24
    with pytest.raises(ValueError):
        decode_uids(np.array([10_000_000]))


def _cityscapes_layout(root, split="val"):
    """gtFinePanopticParts/<split>/<city>/*.tif (int32 uids) + leftImg8bit/<split>/<city>/*.png."""
    h, w = 12, 16
    uid = np.full((h, w), 7, np.int32)               # road (sid only)
    uid[0:2, 0:4] = 24                               # a crowd of persons: no instance id, not an object
    uid[2:6, 0:3] = 2400001                          # person 0, torso
    uid[2:3, 3:5] = 2400002                          # person 0, head
    uid[6:8, 0:3] = 24000                            # person 0 without part label
    uid[2:6, 8:14] = 2600302                         # car 3, wheel
    uid[6:8, 8:14] = 2600300                         # car 3, unlabeled part (pid 0)
    uid[8:10, 8:14] = 26003                          # car 3, no part form
    uid[10:12, 0:5] = 2500107                        # rider 1 with an unknown pid 7
    lab_dir = root / "cityscapes" / "gtFinePanopticParts" / split / "frankfurt"
    img_dir = root / "cityscapes" / "leftImg8bit" / split / "frankfurt"
    lab_dir.mkdir(parents=True)
    img_dir.mkdir(parents=True)
    stem = "frankfurt_000000_000294"
    Image.fromarray(uid, mode="I").save(lab_dir / f"{stem}_gtFinePanopticParts.tif")
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(img_dir / f"{stem}_leftImg8bit.png")
    return uid, stem


def test_cityscapes_parts_objects_and_parts(tmp_path, monkeypatch, caplog):
    uid, stem = _cityscapes_layout(tmp_path)
    assert np.array_equal(np.asarray(Image.open(next((tmp_path / "cityscapes").rglob("*.tif")))), uid)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        dicts = DatasetCatalog.get("cityscapes_parts_val_parts")
    assert "unknown_part_id: 1" in caplog.text
    things, parts, object_parts = cityscapes_parts_vocabulary()
    assert things == ["person", "rider", "car", "truck", "bus"] and len(parts) == 9 and parts == list(CITYSCAPES_PARTS)
    (d,) = dicts
    assert d["image_id"] == stem and (d["height"], d["width"]) == uid.shape and os.path.isfile(d["file_name"])
    objs = {things[a["category_id"]]: a for a in d["annotations"]}
    assert sorted(objs) == ["car", "person", "rider"]  # the crowd region is no object
    sid, iid, _ = decode_uids(uid)
    for name, s, i in (("person", 24, 0), ("car", 26, 3), ("rider", 25, 1)):
        np.testing.assert_array_equal(decode_rle(objs[name]["segmentation"]), (sid == s) & (iid == i))
    person_parts = {parts[p["category_id"]]: decode_rle(p["segmentation"]) for p in objs["person"]["parts"]}
    assert sorted(person_parts) == ["head", "torso"]
    np.testing.assert_array_equal(person_parts["head"], uid == 2400002)
    assert [parts[p["category_id"]] for p in objs["car"]["parts"]] == ["wheel"]
    assert objs["rider"]["parts"] == []
    assert object_parts[things.index("person")] == object_parts[things.index("rider")] == [0, 1, 2, 3]
    assert [parts[p] for p in object_parts[things.index("bus")]] == ["window", "wheel", "light", "license plate",
                                                                     "chassis"]
    _check_parts_inside_objects(dicts)
    inst = load_cityscapes_parts(str(tmp_path / "cityscapes/gtFinePanopticParts/val"),
                                 str(tmp_path / "cityscapes/leftImg8bit/val"))
    assert all("parts" not in a for a in inst[0]["annotations"]) and len(inst[0]["annotations"]) == 3


# ----------------------------------------------------------------------------------------- missing roots
@pytest.mark.parametrize("name,expected", [
    ("pascal_part_train", "pascal_part/VOC2010/JPEGImages"),
    ("pascal_part_fine_val_parts", "pascal_part/VOC2010/JPEGImages"),
    ("part_imagenet_val_parts", "part_imagenet/annotations/val/val.json"),
    ("cityscapes_parts_train", "cityscapes/gtFinePanopticParts/train"),
])
def test_missing_root_names_variable_and_path(tmp_path, monkeypatch, name, expected):
    root = tmp_path / "no_datasets_here"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    with pytest.raises(DatasetNotFoundError) as e:
        DatasetCatalog.get(name)
    msg = str(e.value)
    assert "DETECTRON2_DATASETS" in msg and str(root / expected) in msg


def test_missing_sub_path_is_named(tmp_path, monkeypatch):
    base = _pascal_layout(tmp_path)
    (base / "VOC2010" / "ImageSets" / "Main" / "val.txt").unlink()
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="ImageSets/Main/val.txt"):
        DatasetCatalog.get("pascal_part_val")


def test_every_real_dataset_is_registered_with_metadata():
    assert len(builtin_real.REAL_DATASETS) == 16
    for name in builtin_real.REAL_DATASETS:
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes
        assert meta.evaluator_type == ("parts" if name.endswith("_parts") else "coco")
        if name.endswith("_parts"):
            # Every part class belongs to some object class, and ids stay in range.
            assert {p for ps in meta.object_part_classes.values() for p in ps} == set(range(len(meta.part_classes)))
            assert set(meta.object_part_classes) <= set(range(len(meta.thing_classes)))


@needs_samples
def test_pascal_part_worker_pool_gives_identical_dicts():
    names = ["2008_000009", "2008_000008", "2008_000009_missing"]
    args = (str(SAMPLES / "JPEGImages"), str(SAMPLES / "Annotations"), names, "coarse")
    assert load_pascal_part(*args, num_workers=2) == load_pascal_part(*args, num_workers=0)
