"""AR@k of PartAREvaluator against pycocotools' COCOeval (segm, useCats=0, maxDets=[k], area all)."""
import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detectron2.structures import Instances

from part_distill.evaluation import PartAREvaluator
from part_distill.evaluation.synthetic import synthetic_parts_dataset, synthetic_predictions
from part_distill.utils.masks import decode_rle, encode_rle


def _brute_transform(masks, scores, obj_masks, mode, restriction):
    """Independent re-implementation of the AR variants with explicit loops."""
    masks = masks.copy()
    if restriction == "union":
        union = obj_masks.any(axis=0) if len(obj_masks) else np.zeros(masks.shape[1:], bool)
        masks &= union[None]
    elif restriction == "assigned":
        for i in range(len(masks)):
            inter = [int((masks[i] & o).sum()) for o in obj_masks]
            best = max(range(len(inter)), key=lambda j: (inter[j], -j)) if inter else -1
            masks[i] &= obj_masks[best] if best >= 0 and inter[best] > 0 else False
    if mode == "non_overlap":
        claimed = np.zeros(masks.shape[1:], bool)
        for i in sorted(range(len(masks)), key=lambda i: -scores[i]):  # stable: ties keep order
            masks[i] &= ~claimed
            claimed |= masks[i]
    return masks


def _coco_ar(dicts, outputs, k, mode="overlap", restriction="none"):
    images, gts, dts = [], [], []
    for d, out in zip(dicts, outputs):
        images.append({"id": d["image_id"], "height": d["height"], "width": d["width"]})
        for a in d["annotations"]:
            for p in a["parts"]:
                m = decode_rle(p["segmentation"])
                gts.append({"id": len(gts) + 1, "image_id": d["image_id"], "category_id": 1, "iscrowd": 0,
                            "segmentation": p["segmentation"], "area": float(m.sum()), "bbox": [0, 0, 1, 1]})
        parts = out["parts"]
        masks = parts.pred_masks.numpy()
        scores = [float(s) for s in parts.scores]
        obj = np.stack([decode_rle(a["segmentation"]) for a in d["annotations"]]) if d["annotations"] else \
            np.zeros((0, d["height"], d["width"]), bool)
        masks = _brute_transform(masks, scores, obj, mode, restriction)
        for m, s in zip(masks, scores):
            dts.append({"image_id": d["image_id"], "category_id": 1, "segmentation": encode_rle(m), "score": s})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": gts, "categories": [{"id": 1, "name": "part"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if dts:
            dt = gt.loadRes(dts)
        else:
            dt = COCO()
            dt.dataset = {"images": images, "annotations": [], "categories": gt.dataset["categories"]}
            dt.createIndex()
        ev = COCOeval(gt, dt, "segm")
        ev.params.useCats = 0
        ev.params.maxDets = [k]
        ev.params.areaRng = [[0, 1e10]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
        ev.accumulate()
    r = ev.eval["recall"][:, 0, 0, 0]
    return float(np.mean(r[r > -1])) if (r > -1).any() else -1.0


def _run(dicts, meta, outputs, **kwargs):
    ev = PartAREvaluator(dataset_dicts=dicts, metadata=meta, distributed=False, **kwargs)
    ev.reset()
    for d, out in zip(dicts, outputs):
        ev.process([{"image_id": d["image_id"]}], [out])
    return ev.evaluate()["parts_ar"]


@pytest.mark.parametrize("seed,score_levels", [(0, 0), (1, 4), (2, 0), (3, 2)])
def test_ar_matches_cocoeval(seed, score_levels):
    dicts, meta = synthetic_parts_dataset(12, 40, 48, seed=seed)
    rng = np.random.default_rng(seed)
    outputs = [synthetic_predictions(d, int(rng.integers(0, 25)), score_levels=score_levels, seed=seed * 100 + i)
               for i, d in enumerate(dicts)]
    ks = [1, 3, 10, 20]
    modes, restrictions = ["overlap", "non_overlap"], ["none", "union", "assigned"]
    res = _run(dicts, meta, outputs, ks=ks, modes=modes, restrictions=restrictions)
    assert res["num_gt_parts"] > 0
    for mode in modes:
        for restriction in restrictions:
            for k in ks:
                name = "AR@%d" % k + ("" if mode == "overlap" else "-nonoverlap") + \
                    ("" if restriction == "none" else "-gtobj_" + restriction)
                expected = _coco_ar(dicts, outputs, k, mode, restriction)
                assert abs(res[name] / 100 - expected) < 1e-6, (name, res[name], expected)


def _image(h, w, image_id, parts_masks):
    obj = np.zeros((h, w), bool)
    for m in parts_masks:
        obj |= m
    return {"file_name": "x", "height": h, "width": w, "image_id": image_id, "annotations": [] if not parts_masks else [
        {"category_id": 0, "segmentation": encode_rle(obj), "iscrowd": 0, "id": 100 + image_id,
         "parts": [{"category_id": j, "segmentation": encode_rle(m), "id": j + 10 * image_id}
                   for j, m in enumerate(parts_masks)]}]}


def _output(masks, scores):
    inst = Instances(masks.shape[1:])
    inst.pred_masks = torch.from_numpy(masks)
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    n = len(scores)
    inst.pred_clusters = torch.zeros(n, dtype=torch.long)
    inst.object_index = torch.zeros(n, dtype=torch.long)
    inst.object_classes = torch.zeros(n, dtype=torch.long)
    return {"parts": inst}


def test_ar_iou_ties_no_predictions_and_empty_gt():
    h, w = 4, 8
    a = np.zeros((h, w), bool)
    a[:, :4] = True
    b = ~a
    # det 0 has IoU 0.5 with both GT parts (an IoU tie: COCOeval gives it the *last*, b, which leaves a
    # free for det 1); dets 1 and 2 tie in score (the stable order keeps det 1 first).
    det = np.stack([a | b, a, a | b])
    dicts = [_image(h, w, 0, [a, b]), _image(h, w, 1, []), _image(h, w, 2, [a])]
    outputs = [_output(det, [0.9, 0.5, 0.5]), _output(det[:1], [0.9]), _output(np.zeros((0, h, w), bool), [])]
    meta = {"thing_classes": ["o"], "part_classes": ["a", "b"]}
    for k in (1, 2, 3):
        res = _run(dicts, meta, outputs, ks=[k], modes=["overlap", "non_overlap"])
        for mode in ("overlap", "non_overlap"):
            name = f"AR@{k}" + ("" if mode == "overlap" else "-nonoverlap")
            assert abs(res[name] / 100 - _coco_ar(dicts, outputs, k, mode)) < 1e-6
    # At IoU .5 both parts of image 0 are found within 2 detections; only a at higher thresholds.
    assert _run(dicts, meta, outputs, ks=[2])["AR@2"] == pytest.approx(100 * (2 + 9 * 1 + 10 * 0) / 30)


def test_ar_without_predictions_is_zero_and_without_gt_is_nan():
    dicts, meta = synthetic_parts_dataset(4, 16, 16, empty_image_prob=0.0, seed=5)
    empty = [_output(np.zeros((0, 16, 16), bool), []) for _ in dicts]
    res = _run(dicts, meta, empty, ks=[10])
    assert res["AR@10"] == 0.0 and _coco_ar(dicts, empty, 10) == 0.0
    no_gt = [_image(16, 16, i, []) for i in range(3)]
    res = _run(no_gt, meta, [_output(np.ones((2, 16, 16), bool), [0.3, 0.2])] * 3, ks=[10])
    assert np.isnan(res["AR@10"])


def test_ar_rejects_wrong_mask_size():
    dicts, meta = synthetic_parts_dataset(1, 16, 16, empty_image_prob=0.0, seed=1)
    ev = PartAREvaluator(dataset_dicts=dicts, metadata=meta, distributed=False)
    with pytest.raises(ValueError, match="expected \\[N, 16, 16\\]"):
        ev.process([{"image_id": 0}], [_output(np.zeros((1, 8, 8), bool), [0.1])])
