"""tools/demo.py logic: overlays checked pixel-wise against the saved part masks, skips, records."""
import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch

from part_distill.data.contact_sheet import _legend
from part_distill.utils.masks import decode_rle, encode_rle
from detectron2.structures import Instances

from part_distill.visualization.demo import demo_main, draw_part_overlay, part_colour, run_demo
from part_distill.visualization.predictor import PartPredictor, whole_image_objects
from part_distill.visualization.records import load_prediction_records

from _tiny_part_model import tiny_part_cfg, tiny_part_opts

SIZES = {"a": (48, 64), "b": (64, 40)}  # (H, W)
THINGS = ["car", "cat", "cup"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_in")
    rng = np.random.default_rng(0)
    for name, (h, w) in SIZES.items():
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img[h // 4: 3 * h // 4, w // 4: 3 * w // 4] //= 3  # some structure for the random net
        cv2.imwrite(str(root / f"{name}.png"), img)
    (root / "c_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return PartPredictor(tiny_part_cfg("MODEL.PART_DISTILL.TEST.PARTS_PER_IMAGE", "4"), objects="whole-image")


def _expected_blend(base, colour):
    return (0.35 * base + 0.65 * np.array(colour, np.float32)).astype(np.uint8)


def _near_boundary(mask):
    m = mask.astype(np.uint8)
    k = np.ones((3, 3), np.uint8)
    return (cv2.dilate(m, k) != cv2.erode(m, k, borderType=cv2.BORDER_CONSTANT, borderValue=0)).astype(bool)


def test_overlays_records_and_skips(images, predictor, tmp_path):
    cfg = predictor.cfg
    out = run_demo(cfg, [str(images / "*.png")], str(tmp_path), objects="whole-image",
                   confidence_threshold=0.0, thing_classes=THINGS, predictor=predictor)
    assert out["skipped"] == {"unreadable_image": 1}
    assert sorted(p.rsplit("/", 1)[-1] for p in out["written"]) == ["a.png", "b.png"]
    records, things = load_prediction_records(out["predictions"])
    assert things == THINGS and len(records) == 2
    k = cfg.MODEL.PART_DISTILL.CLUSTERS_PER_CLASS
    checked = 0
    for rec in records:
        name = rec["file_name"].rsplit("/", 1)[-1][:-4]
        h, w = SIZES[name]
        base = cv2.imread(rec["file_name"])
        overlay = cv2.imread(str(tmp_path / f"{name}.png"))
        assert overlay.shape[1] == w and overlay.shape[0] >= h and (rec["height"], rec["width"]) == (h, w)
        # Records round-trip: the saved masks/scores are exactly what the model returns.
        again = predictor(base, objects=whole_image_objects(h, w))["parts"]
        assert len(rec["parts"]) == len(again) == 4
        for p, m, s in zip(rec["parts"], again.pred_masks.numpy(), again.scores.numpy()):
            assert np.array_equal(decode_rle(p["segmentation"]), m) and p["score"] == pytest.approx(float(s))
            assert p["object_class"] == 0 and p["object_segmentation"] == encode_rle(np.ones((h, w), bool))
        masks = [decode_rle(p["segmentation"]) for p in rec["parts"]]
        excluded = np.zeros((h, w), bool)
        excluded[:16] = True  # the object's class-name label sits at the top-left of the whole-image object
        for m in masks + [np.ones((h, w), bool)]:
            excluded |= _near_boundary(m)
        covered = np.zeros((h, w), bool)
        for i, (p, m) in enumerate(zip(rec["parts"], masks)):
            top = m & ~covered & ~excluded  # part 0 (best score) is painted last, i.e. on top
            covered |= m
            colour = part_colour(p["object_class"], p["cluster_id"], k, len(THINGS), rank=i)
            got = overlay[:h][top].astype(int)
            want = _expected_blend(base[top], colour).astype(int)
            assert np.abs(got - want).max(initial=0) <= 1
            checked += int(top.sum())
        free = ~covered & ~excluded  # no part: dimmed image
        assert np.abs(overlay[:h][free].astype(int) - (base[free] * 0.3).astype(int)).max(initial=0) <= 1
    assert checked > 0  # the pixel check really covered part pixels (random-net masks are ragged)


def test_gt_objects_from_coco_json(images, tmp_path):
    h, w = SIZES["a"]
    obj = np.zeros((h, w), bool)
    obj[5:40, 10:50] = True
    rle = encode_rle(obj)
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": h, "width": w}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "segmentation": rle, "area": int(obj.sum()),
                             "bbox": [10, 5, 40, 35], "iscrowd": 0}],
            "categories": [{"id": 3, "name": "x"}, {"id": 7, "name": "y"}]}
    (tmp_path / "gt.json").write_text(json.dumps(coco))
    summary = demo_main(["--input", str(images / "a.png"), str(images / "b.png"), "--output", str(tmp_path / "o"),
                         "--objects", "gt", "--gt-json", str(tmp_path / "gt.json"), "--confidence-threshold", "0",
                         *tiny_part_opts(), "MODEL.PART_DISTILL.TEST.PARTS_PER_IMAGE", "4"],
                        register_world=False)
    assert summary["skipped"] == {"no_ground_truth": 1}  # b.png is not in the json
    records, _ = load_prediction_records(summary["predictions"])
    parts = records[0]["parts"]
    owned = [p for p in parts if p["object_class"] >= 0]
    # Eq. 1 with one gt object: every part overlapping it is owned by it, with its contiguous class (7 -> 1).
    for p in parts:
        overlaps = (decode_rle(p["segmentation"]) & obj).any()
        assert (p["object_class"] == 1) == bool(overlaps)
    for p in owned:
        assert np.array_equal(decode_rle(p["object_segmentation"]), obj)



def test_overlay_of_known_parts_pixelwise():
    h, w = 40, 60
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    obj = np.zeros((h, w), bool)
    obj[4:36, 4:56] = True
    p0, p1 = np.zeros((h, w), bool), np.zeros((h, w), bool)
    p0[6:20, 6:30] = True
    p1[14:34, 20:54] = True  # overlaps p0: p0 scores higher and must stay on top
    parts = Instances((h, w), pred_masks=torch.from_numpy(np.stack([p0, p1])), scores=torch.tensor([0.9, 0.6]),
                      pred_clusters=torch.tensor([2, 5]), object_index=torch.tensor([0, 0]),
                      object_classes=torch.tensor([1, 1]))
    objects = Instances((h, w), pred_masks=torch.from_numpy(obj[None]), pred_classes=torch.tensor([1]),
                        scores=torch.tensor([1.0]))
    out = draw_part_overlay(image, {"instances": objects, "parts": parts}, THINGS, 8)
    assert out.shape[1] == w and out.shape[0] > h  # legend below the image rows
    c0, c1 = part_colour(1, 2, 8, 3), part_colour(1, 5, 8, 3)
    assert c0 != c1 and c0 == part_colour(1, 2, 8, 3, rank=7)  # a cluster's colour ignores rank
    label = np.zeros((h, w), bool)
    label[:14] = True  # the object's class name is written at its top-left corner
    top0 = p0 & ~_near_boundary(p0) & ~_near_boundary(p1) & ~label  # all outlines are drawn over all fills
    top1 = p1 & ~p0 & ~_near_boundary(p1) & ~_near_boundary(p0)
    np.testing.assert_array_equal(out[:h][top0], _expected_blend(image[top0], c0))
    np.testing.assert_array_equal(out[:h][top1], _expected_blend(image[top1], c1))
    outline = obj & ~cv2.erode(obj.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    outline &= ~label
    assert (out[:h][outline & ~p0 & ~p1] == 255).all()  # white object outline


def test_image_without_confident_parts_gets_overlay_and_record(predictor, tmp_path):
    h, w = 48, 256  # wide enough for the whole legend title to be drawn
    image = np.random.default_rng(2).integers(0, 256, (h, w, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "wide.png"), image)
    # Part scores are probabilities, so none reaches 1.01: the final model unsure of every part.
    out = run_demo(predictor.cfg, [str(tmp_path / "wide.png")], str(tmp_path / "out"), objects="whole-image",
                   confidence_threshold=1.01, thing_classes=THINGS, predictor=predictor)
    assert out["written"] == [str(tmp_path / "out" / "wide.png")] and out["skipped"] == {}
    overlay = cv2.imread(out["written"][0])
    # no part, hence no owner outline either: the image rows are the dimmed image
    assert np.abs(overlay[:h].astype(int) - (image * 0.3).astype(int)).max() <= 1
    np.testing.assert_array_equal(overlay[h:], _legend(w, [], "no part with score >= 1.01"))
    records, things = load_prediction_records(out["predictions"])
    assert things == THINGS and [(r["file_name"], r["parts"]) for r in records] == [(str(tmp_path / "wide.png"), [])]


def test_folder_input_is_its_sorted_images(images, predictor, tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for src, name in (("b.png", "b.png"), ("a.png", "a.png"), ("a.png", "C.PNG"), ("a.png", "sub/d.png")):
        shutil.copy(images / src, folder / name)
    (folder / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    inputs = [str(folder), str(tmp_path / "empty"), str(tmp_path / "missing.png")]
    out = run_demo(predictor.cfg, inputs, str(tmp_path / "out"), objects="whole-image", confidence_threshold=0.0,
                   predictor=predictor)
    # not recursive, image extensions only (any case), sorted by name
    assert [os.path.basename(p) for p in out["written"]] == ["C.png", "a.png", "b.png"]
    records, _ = load_prediction_records(out["predictions"])
    assert [r["file_name"] for r in records] == [str(folder / n) for n in ("C.PNG", "a.png", "b.png")]
    assert out["skipped"] == {"folder_without_images": 1, "missing_input": 1}
    # inputs naming no image at all are a command-line error, before any model is built
    with pytest.raises(SystemExit) as exit_:
        demo_main(["--input", str(tmp_path / "empty"), str(tmp_path / "missing.png"), "--output",
                   str(tmp_path / "out2"), "--objects", "whole-image", *tiny_part_opts()], register_world=False)
    assert exit_.value.code == 2 and "no image file found" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()
