"""Purity collages: pixel-exact tiles on a toy case, layout, empties, seeding, index files, records."""
import json

import cv2
import numpy as np
import pytest
import torch
from detectron2.structures import Instances
from scipy import ndimage

from part_distill.utils.masks import decode_rle, encode_rle
from part_distill.visualization import collages as C
from part_distill.visualization.records import (
    load_prediction_records, prediction_record, records_from_mined_shard, save_prediction_records,
    validate_records)

H = W = 40
TILE = 40  # object box is 20x20 and margin 0: every crop pixel becomes an exact 2x2 block
BOX = [10.0, 10.0, 20.0, 20.0]
RED_VALUES = [71, 91, 111, 131, 151, 171, 191, 211, 231, 51, 31, 11]  # 0.3*r, 0.6*r, (r+255)/2 never x.5


def _object_mask():
    m = np.zeros((H, W), bool)
    m[10:30, 10:30] = True
    m[10:14, 10:14] = False  # a notch, so object and background dimming both show up in the crop
    return m


def _part_mask(k):
    m = np.zeros((H, W), bool)
    m[15 + k % 3:22, 14:24 - k % 4] = True
    m[25, 20] = True  # single pixel: all boundary
    return m


def _colour(k):
    return (10 * (k % 5) + 20, 100, RED_VALUES[k])  # BGR, one per image: tells which image a tile shows


def _write_image(path, colour):
    img = np.empty((H, W, 3), np.uint8)
    img[:] = colour
    assert cv2.imwrite(str(path), img)


def _part(k, cluster, cls=0):
    return {"segmentation": encode_rle(_part_mask(k)), "score": 0.9, "cluster_id": cluster, "object_class": cls,
            "object_bbox": BOX, "object_segmentation": encode_rle(_object_mask())}


@pytest.fixture
def toy(tmp_path):
    """12 one-colour images; cluster (0, 0) has 11 instances, (0, 1) has 2, (1, 2) has 1."""
    records = []
    for k in range(12):
        path = tmp_path / f"img{k:02d}.png"
        _write_image(path, _colour(k))
        parts = []
        if k < 11:
            parts.append(_part(k, 0))
        if k < 2:
            parts.append(_part(k, 1))
        if k == 11:
            parts.append(_part(k, 2, cls=1))
        records.append({"file_name": str(path), "height": H, "width": W, "parts": parts})
    return records


def _expected_tile(k):
    """Built independently of the module: nearest 2x upscale, dim/tint by hand, scipy boundary."""
    up = lambda m: np.kron(m[10:30, 10:30], np.ones((2, 2), int)).astype(bool)  # noqa: E731
    part, obj = up(_part_mask(k)), up(_object_mask())
    c = np.array(_colour(k), np.float64)
    out = np.where(obj[..., None], np.rint(c * 0.6), np.rint(c * 0.3))
    out[part] = np.rint(0.5 * c + 0.5 * np.array([0, 0, 255.0]))
    boundary = part & ~ndimage.binary_erosion(part, ndimage.generate_binary_structure(2, 1), border_value=0)
    out[boundary] = (0, 0, 255)
    return out.astype(np.uint8)


def _tile_at(canvas, i, gap=4):
    y, x = gap + (i // 3) * (TILE + gap), gap + (i % 3) * (TILE + gap)
    return canvas[y:y + TILE, x:x + TILE]


def _which_image(tile):
    """Index k of the image a tile shows: the one whose independently built rendering it equals."""
    matches = [k for k in range(12) if np.array_equal(tile, _expected_tile(k))]
    assert len(matches) == 1, "tile does not match exactly one expected rendering"
    return matches[0]


def _make(records, out, **kw):
    return C.make_collages(records, ["dog", "cat"], str(out), tile_size=TILE, margin=0.0, **kw)


def test_full_collage_pixels_sampling_and_index(toy, tmp_path):
    out = tmp_path / "col"
    index = _make(toy, out, seed=3, method="toy")
    assert set(index["collages"]) == {"class0000_cluster000", "class0000_cluster001", "class0001_cluster002"}
    canvas = cv2.imread(str(out / "class0000_cluster000.png"))
    assert canvas.shape == (3 * TILE + 4 * 4,) * 2 + (3,)
    shown = [_which_image(_tile_at(canvas, i)) for i in range(9)]
    assert len(set(shown)) == 9 and set(shown) <= set(range(11))  # 9 distinct instances of this cluster
    entry = index["collages"]["class0000_cluster000"]
    assert [f"img{k:02d}.png" for k in shown] == [i["file_name"].rsplit("/", 1)[-1] for i in entry["instances"]]
    assert (entry["num_instances"], entry["num_shown"], entry["class_name"], entry["cluster_id"]) == (11, 9, "dog", 0)
    # Every pixel outside the tiles is canvas background.
    bg = np.ones(canvas.shape[:2], bool)
    for i in range(9):
        y, x = C.tile_origin(i, TILE)
        bg[y:y + TILE, x:x + TILE] = False
    assert (canvas[bg] == C.BACKGROUND).all()
    on_disk = json.loads((out / "index.json").read_text())
    assert on_disk["collages"] == index["collages"]
    page = (out / "index.html").read_text()
    assert all(f'src="{cid}.png"' in page for cid in index["collages"])
    # Same seed: identical bytes; another seed: another sample (11 choose 9 orders, so this differs).
    again = _make(toy, tmp_path / "again", seed=3)
    assert (tmp_path / "again" / "class0000_cluster000.png").read_bytes() == (out / "class0000_cluster000.png").read_bytes()
    assert again["collages"]["class0000_cluster000"]["instances"] == entry["instances"]
    other = _make(toy, tmp_path / "other", seed=4)
    assert other["collages"]["class0000_cluster000"]["instances"] != entry["instances"]


def test_small_cluster_fills_what_exists_and_marks_empties(toy, tmp_path):
    _make(toy, tmp_path)
    canvas = cv2.imread(str(tmp_path / "class0000_cluster001.png"))
    assert sorted(_which_image(_tile_at(canvas, i)) for i in range(2)) == [0, 1]
    diag = np.eye(TILE, dtype=bool) | np.fliplr(np.eye(TILE, dtype=bool))
    for i in range(2, 9):
        t = _tile_at(canvas, i)
        assert (t[diag] == C.EMPTY_MARK).all() and (t[~diag] == C.EMPTY_FILL).all()


def test_sampling_of_a_cluster_ignores_other_classes(toy, tmp_path):
    a = _make(toy, tmp_path / "a")
    only = [dict(r, parts=[p for p in r["parts"] if p["object_class"] == 0]) for r in toy]
    b = _make(only, tmp_path / "b")
    assert a["collages"]["class0000_cluster000"] == b["collages"]["class0000_cluster000"]
    assert "class0001_cluster002" not in b["collages"]


def test_unreadable_image_is_counted_and_replaced(toy, tmp_path):
    broken = [dict(r) for r in toy]
    (tmp_path / "img00.png").write_bytes(b"not a png")
    index = _make(broken, tmp_path / "out", seed=0)
    e = index["collages"]["class0000_cluster000"]
    # Cluster 0 keeps 9 tiles from the 10 readable images; cluster 1 shows only image 1.
    assert e["num_shown"] == 9 and "img00.png" not in json.dumps(e["instances"])
    assert index["collages"]["class0000_cluster001"]["num_shown"] == 1
    assert index["skipped"] == {"unreadable_image": 2}


def test_letterbox_and_large_part_filter(tmp_path):
    path = tmp_path / "wide.png"
    _write_image(path, (20, 100, 71))
    part = np.zeros((H, W), bool)
    part[12:16, 0:40] = True  # crop rows 2..5 -> tile rows 17..20; 18, 19 are interior
    obj = np.zeros((H, W), bool)
    obj[10:20, 0:40] = True
    rec = {"file_name": str(path), "height": H, "width": W, "parts": [
        {"segmentation": encode_rle(part), "score": 1.0, "cluster_id": 0, "object_class": 0,
         "object_segmentation": encode_rle(obj)}]}
    C.make_collages([rec], ["x"], str(tmp_path / "o"), tile_size=TILE, margin=0.0)
    tile = _tile_at(cv2.imread(str(tmp_path / "o" / "class0000_cluster000.png")), 0)
    # 40x10 crop (box from the object mask) -> 40x10 centred rows 15..24, black letterbox elsewhere.
    assert (tile[:15] == C.LETTERBOX).all() and (tile[25:] == C.LETTERBOX).all()
    assert (tile[18:20, 1:-1] == np.rint(0.5 * np.array([20, 100, 71]) + [0, 0, 127.5])).all()
    # The part covers 40% of the object: kept at 0.45, dropped at 0.35.
    assert C.make_collages([rec], ["x"], str(tmp_path / "p"), max_part_area_fraction=0.45)["collages"]
    idx = C.make_collages([rec], ["x"], str(tmp_path / "q"), max_part_area_fraction=0.35)
    assert idx["collages"] == {} and idx["skipped"] == {"part_too_large": 1}


def test_records_roundtrip_and_validation(toy, tmp_path):
    save_prediction_records(tmp_path / "p.json", toy, ["dog", "cat"])
    records, classes = load_prediction_records(tmp_path / "p.json")
    assert records == toy and classes == ["dog", "cat"]
    bad = [dict(toy[0], parts=[{"score": 1.0}])]
    with pytest.raises(ValueError, match="part 0 lacks"):
        validate_records(bad)
    (tmp_path / "x.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a part predictions file"):
        load_prediction_records(tmp_path / "x.json")


def test_prediction_record_from_model_output():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 5:7, 2:6] = True
    obj = torch.zeros(1, 8, 8, dtype=torch.bool)
    obj[0, 0:8, 1:7] = True
    inst = Instances((8, 8), pred_masks=obj, pred_classes=torch.tensor([4]), scores=torch.tensor([0.8]))
    parts = Instances((8, 8), pred_masks=masks, scores=torch.tensor([0.7, 0.2]),
                      pred_clusters=torch.tensor([3, -1]), object_index=torch.tensor([0, -1]),
                      object_classes=torch.tensor([4, -1]))
    rec = prediction_record("a.jpg", {"instances": inst, "parts": parts})
    validate_records([rec])
    assert [p["cluster_id"] for p in rec["parts"]] == [3, -1]
    assert (decode_rle(rec["parts"][1]["segmentation"]) == masks[1].numpy()).all()
    assert rec["parts"][0]["object_bbox"] == [1.0, 0.0, 6.0, 8.0]
    assert "object_bbox" not in rec["parts"][1]


def test_records_from_mined_shard():
    m = np.zeros((6, 6), bool)
    m[1:3, 1:3] = True
    shard = {"images": [{"id": 1, "file_name": "a.png", "height": 6, "width": 6}],
             "objects": [{"id": 4096, "score": 0.5, "bbox": [0, 0, 6, 6], "segmentation": encode_rle(np.ones((6, 6)))}],
             "annotations": [{"id": 4096 * 64 + 2, "image_id": 1, "object_id": 4096, "object_category_id": 7,
                              "cluster": 2, "segmentation": encode_rle(m)}]}
    (rec,) = records_from_mined_shard(shard)
    (p,) = rec["parts"]
    assert (p["cluster_id"], p["object_class"], p["score"], p["object_bbox"]) == (2, 7, 0.5, [0, 0, 6, 6])
