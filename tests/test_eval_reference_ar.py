"""PartARReferenceEvaluator (the reference's AR protocol) against hand-computed values on an example
where it and ours (PartAREvaluator, COCOeval) give different numbers."""
import numpy as np
import pytest
import torch
from detectron2.structures import Instances

from part_distill.engine.setup import build_cfg
from part_distill.evaluation import PartAREvaluator, PartARReferenceEvaluator
from part_distill.evaluation.build import build_part_evaluators
from part_distill.evaluation.reference_ar import max_overlap_matching
from part_distill.utils.masks import encode_rle

H, W = 6, 8


def _m(rows, cols):
    m = np.zeros((H, W), dtype=bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


# One object (rows 0-3) with parts A1, A2 (both class 0, "leg") and B (class 1).
A1, A2, B = _m((0, 4), (0, 2)), _m((0, 4), (2, 4)), _m((0, 4), (4, 8))
OBJ = A1 | A2 | B
# Proposals by score: p1 = A1 u A2, p2 outside the object (touches no part), p3 = B, p4 = A1.
PROPOSALS = [(A1 | A2, 0.9), (_m((4, 6), (0, 8)), 0.8), (B, 0.7), (A1, 0.6)]
KS = [1, 2, 3, 4]


def _dataset():
    parts = [{"category_id": c, "segmentation": encode_rle(m), "id": i + 1} for i, (m, c) in enumerate(
        [(A1, 0), (A2, 0), (B, 1)])]
    dicts = [{"image_id": 1, "height": H, "width": W, "file_name": "x.png",
              "annotations": [{"category_id": 0, "segmentation": encode_rle(OBJ), "iscrowd": 0, "id": 1,
                               "parts": parts}]}]
    meta = {"thing_classes": ["dog"], "part_classes": ["leg", "body"], "object_part_classes": {0: [0, 1]}}
    return dicts, meta


def _output():
    n = len(PROPOSALS)
    inst = Instances((H, W))
    inst.pred_masks = torch.from_numpy(np.stack([m for m, _ in PROPOSALS]))
    inst.scores = torch.tensor([s for _, s in PROPOSALS])
    inst.pred_clusters = torch.zeros(n, dtype=torch.long)
    inst.object_index = torch.zeros(n, dtype=torch.long)
    inst.object_classes = torch.zeros(n, dtype=torch.long)
    return {"parts": inst}


def _run(cls, **kwargs):
    dicts, meta = _dataset()
    ev = cls(dataset_dicts=dicts, metadata=meta, distributed=False, ks=KS, **kwargs)
    ev.reset()
    ev.process([{"image_id": 1}], [_output()])
    return ev.evaluate()


def _ar(res, task):
    return [res[task][f"AR@{k}"] for k in KS]


def test_ours_is_cocoeval_on_the_example():
    # GT A1, A2, B; IoU(p1, A1) = IoU(p1, A2) = 0.5. Score order: p1 takes A2 at t=.5 only (COCOeval: the
    # last of tied GTs), p2 nothing, p3 B and p4 A1 at every t.  AR@1 = AR@2 = (1/3)/10; AR@3 = (2 + 9)/30;
    # AR@4 = (3 + 18)/30.
    assert _ar(_run(PartAREvaluator), "parts_ar") == pytest.approx([100 / 30, 100 / 30, 1100 / 30, 2100 / 30])


def test_reference_protocol_hand_computed():
    # Merged GT: A = A1 u A2, B. p2 dropped (IoU 0 with every part): kept p1 (A: 1.0), p3 (B: 1.0),
    # p4 (A: 0.5). AR@1: A recalled at every t -> 50; AR@2..4: A and B -> 100.
    res = _run(PartARReferenceEvaluator)
    assert list(res) == ["parts_ar_reference"]
    assert _ar(res, "parts_ar_reference") == pytest.approx([50.0, 100.0, 100.0, 100.0])
    assert res["parts_ar_reference"]["num_gt_parts"] == 2


def test_reference_without_merging_only_drops_and_matches():
    # GT A1, A2, B; kept p1, p3, p4. AR@1 [p1]: one GT at .5 -> 1/30. AR@2 [p1, p3]: B 1.0 then A1|A2 0.5
    # -> (2 + 9)/30 (ours: 1/30, p2 took the slot). AR@3: B 1.0, A1 1.0 (p4), A2 0.5 -> (3 + 18)/30.
    res = _run(PartARReferenceEvaluator, merge_same_class=False)
    assert _ar(res, "parts_ar_reference") == pytest.approx([100 / 30, 1100 / 30, 2100 / 30, 2100 / 30])


def test_image_without_surviving_proposals_is_left_out():
    # A second image whose only proposal touches none of its GT parts: ours counts its part (4 GT:
    # AR@4 = (3 + 18)/40), the reference drops the proposal and then ignores the image.
    dicts, meta = _dataset()
    other = _m((0, 2), (0, 2))
    dicts.append({"image_id": 2, "height": H, "width": W, "file_name": "y.png", "annotations": [
        {"category_id": 0, "segmentation": encode_rle(OBJ), "iscrowd": 0, "id": 2,
         "parts": [{"category_id": 0, "segmentation": encode_rle(other), "id": 9}]}]})
    stray = Instances((H, W))
    stray.pred_masks = torch.from_numpy(_m((4, 6), (0, 8))[None])
    stray.scores = torch.tensor([0.5])
    for f in ("pred_clusters", "object_index", "object_classes"):
        stray.set(f, torch.zeros(1, dtype=torch.long))
    results = {}
    for cls in (PartAREvaluator, PartARReferenceEvaluator):
        ev = cls(dataset_dicts=dicts, metadata=meta, distributed=False, ks=KS)
        ev.reset()
        ev.process([{"image_id": 1}, {"image_id": 2}], [_output(), {"parts": stray}])
        results.update(ev.evaluate())
    assert _ar(results, "parts_ar") == pytest.approx([100 / 40, 100 / 40, 1100 / 40, 2100 / 40])
    assert _ar(results, "parts_ar_reference") == pytest.approx([50.0, 100.0, 100.0, 100.0])


def test_drop_threshold_is_configurable():
    # Unmerged GT, drop at 0.6: p1 (best IoU 0.5) goes too; kept p3 (B), p4 (A1). AR@1: 1 of 3 GT at every
    # t; AR@2..4: 2 of 3.
    res = _run(PartARReferenceEvaluator, merge_same_class=False, min_iou=0.6)
    assert _ar(res, "parts_ar_reference") == pytest.approx([100 / 3, 200 / 3, 200 / 3, 200 / 3])


def test_max_overlap_matching_differs_from_score_order():
    # d0 (higher score) overlaps g1 best (0.7) and g0 (0.6); d1 covers g1 at 0.9. Max-overlap pairs
    # (d1, g1) first, then (d0, g0); COCOeval's score order would give g1 to d0 and leave g0 unmatched.
    np.testing.assert_allclose(max_overlap_matching(np.array([[0.6, 0.7], [0.0, 0.9]])), [0.6, 0.9])


def test_built_from_config_by_name():
    dicts, meta = _dataset()
    from detectron2.data import DatasetCatalog, MetadataCatalog

    DatasetCatalog.pop("ref_ar_example_parts", None)
    MetadataCatalog.pop("ref_ar_example_parts", None)
    DatasetCatalog.register("ref_ar_example_parts", lambda: dicts)
    MetadataCatalog.get("ref_ar_example_parts").set(**meta)
    cfg = build_cfg("", ["TEST.PARTS.EVALUATORS", '["PartAREvaluator", "PartARReferenceEvaluator"]',
                         "TEST.PARTS.AR_KS", "[1, 2, 3, 4]", "TEST.PARTS.AR_MODES", '["overlap"]',
                         "TEST.PARTS.RESTRICT_TO_GT_OBJECT", '["none"]'])
    evs = build_part_evaluators(cfg, "ref_ar_example_parts")
    evs.reset()
    evs.process([{"image_id": 1}], [_output()])
    res = evs.evaluate()
    assert _ar(res, "parts_ar") == pytest.approx([100 / 30, 100 / 30, 1100 / 30, 2100 / 30])
    assert _ar(res, "parts_ar_reference") == pytest.approx([50.0, 100.0, 100.0, 100.0])
