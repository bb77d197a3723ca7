"""Few-shot supervised stage: identity-association mIoU vs brute force, part-category targets and
class-head re-initialisation on a tiny world, and the Table-4 writer."""
import os

import numpy as np
import pytest
import torch
from fvcore.common.checkpoint import _IncompatibleKeys

import part_distill  # noqa: F401  (registers datasets and models)
from detectron2.data import DatasetCatalog
from detectron2.utils.env import seed_all_rng
from part_distill.data.parts_world import WorldSettings
from part_distill.drivers.few_shot_table import build_few_shot_steps, few_shot_markdown, write_few_shot_table
from part_distill.engine.setup import build_cfg
from part_distill.engine.supervised import (REINITIALISED_KEYS, check_initialisation, part_target_dicts,
                                            run_supervised)
from part_distill.engine.trainer import PartDistillTrainer
from part_distill.evaluation import PartMIoUEvaluator
from part_distill.evaluation.synthetic import synthetic_parts_dataset, synthetic_predictions
from part_distill.modeling.criterion import SetCriterion
from part_distill.utils.masks import decode_rle
from test_eval_nmi_ari import _evaluate, brute_pixel_labels
from test_self_training import tiny_cfg as self_training_tiny_cfg

SETTINGS = WorldSettings(num_train=4, num_val=2, image_size=64, max_objects=2)
NUM_PARTS = 14  # part categories of the parts world


# ---------------------------------------------------------------- identity association vs brute force
def _brute_identity_miou(labels, part_classes_of):
    """Per object class: a pixel is predicted part p = its cluster id when p is a part of the class."""
    result = {}
    for c in sorted({l[1] for l in labels}):
        allowed = part_classes_of.get(c)
        ev = [(pred[1] if pred[1] >= 0 and (allowed is None or pred[1] in allowed) else -2, g)
              for _, oc, pred, g in labels if oc == c]
        ious = []
        for part in sorted(set(allowed or ()) | {g for _, g in ev if g >= 0} | {p for p, _ in ev if p >= 0}):
            tp = sum(1 for p, g in ev if p == part and g == part)
            union = sum(1 for p, g in ev if p == part or g == part)
            if union:
                ious.append(tp / union)
        if ious:
            result[c] = 100 * float(np.mean(ious))
    return result


@pytest.mark.parametrize("seed,unlabeled,restricted", [(0, "ignore", True), (1, "label", True), (2, "ignore", False)])
def test_identity_miou_matches_brute_force(seed, unlabeled, restricted):
    dicts, meta = synthetic_parts_dataset(8, 20, 24, parts_per_class=3, seed=seed)
    if not restricted:
        meta = dict(meta, object_part_classes={})
    rng = np.random.default_rng(seed)
    # Cluster ids are global part ids 0..8 (-1 = none): some belong to the object's class, some not.
    outputs = [synthetic_predictions(d, int(rng.integers(0, 10)), num_clusters=9, score_levels=3,
                                     seed=seed * 40 + i) for i, d in enumerate(dicts)]
    # The match split settings must not matter: nothing is fitted.
    res = _evaluate(PartMIoUEvaluator, dicts, meta, outputs, association="identity", match_fraction=0.5,
                    unlabeled_gt=unlabeled)["parts_miou"]
    expected = _brute_identity_miou(brute_pixel_labels(dicts, outputs, unlabeled),
                                    meta["object_part_classes"] or {})
    assert len(expected) >= 2
    for c, value in expected.items():
        assert res[f"mIoU-object{c}"] == pytest.approx(value, abs=1e-9)
    assert res["mIoU"] == pytest.approx(np.mean(list(expected.values())), abs=1e-9)
    assert res["separate_split"] == 1.0 and res["num_eval_images"] == len(dicts)


# ---------------------------------------------------------------- tiny world runs
@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_world_factory):
    tiny_world_factory(SETTINGS)
    yield tmp_path_factory.mktemp("sup")


def tiny_cfg(out_dir, *opts):
    # test_self_training's tiny model as a supervised part model on part categories, with identity
    # augmentation (scale 1, no flip, crop = image): targets are the GT part masks themselves.
    return self_training_tiny_cfg(
        out_dir, "PART_DISTILL.STAGE", "supervised", "MODEL.META_ARCHITECTURE", "SupervisedPartModel",
        "MODEL.PART_DISTILL.CLUSTERS_PER_CLASS", "3", "MODEL.PART_DISTILL.NUM_PART_CLASSES", str(NUM_PARTS),
        "MODEL.PART_DISTILL.OBJECTS", "gt", "INPUT.MIN_SCALE", "1.0", "INPUT.MAX_SCALE", "1.0",
        "INPUT.RANDOM_FLIP", "none", "INPUT.PART_CLASS_KEY", "category_id", "SOLVER.CHECKPOINT_PERIOD", "100",
        "SOLVER.WARMUP_ITERS", "0", "DATASETS.TRAIN", '("parts_world_train_parts",)',
        "DATASETS.TEST", '("parts_world_val_parts",)', "TEST.PARTS.EVALUATORS", '["PartMIoUEvaluator"]',
        "TEST.PARTS.ASSOCIATION", "identity", "SOLVER.BASE_LR", "0.001", *opts)


def _gt_parts_by_image():
    """image_id -> (part category ids, part masks) in annotation order (objects, then their parts)."""
    out = {}
    for d in DatasetCatalog.get("parts_world_train_parts"):
        parts = [p for a in d["annotations"] if not a.get("iscrowd", 0) for p in a["parts"]]
        out[d["image_id"]] = ([p["category_id"] for p in parts],
                              np.stack([decode_rle(p["segmentation"]) for p in parts]).astype(bool))
    return out


def test_run_supervised_trains_on_part_categories_and_reinitialises_only_the_class_head(world, monkeypatch):
    # "Our model": a stage-4-like checkpoint whose part head has 7 x 3 slots + 1, perturbed so that no
    # weight equals a fresh initialisation.
    slot_cfg = tiny_cfg(world / "x", "MODEL.META_ARCHITECTURE", "PartDistillationModel",
                        "MODEL.PART_DISTILL.NUM_PART_CLASSES", "21")
    torch.manual_seed(1)
    state = {k: (v + 0.25 if v.dtype.is_floating_point else v)
             for k, v in PartDistillTrainer.build_model(slot_cfg).state_dict().items()}
    ckpt = str(world / "ours.pth")
    torch.save({"model": state}, ckpt)

    seen = []
    original = SetCriterion.forward

    def recording(self, outputs, targets):
        seen.append([(t["labels"].clone(), t["masks"].clone()) for t in targets])
        return original(self, outputs, targets)

    monkeypatch.setattr(SetCriterion, "forward", recording)
    out = world / "ours_run"
    # LR 0: the saved final model is exactly the initialised one.
    cfg = tiny_cfg(out, "MODEL.WEIGHTS", ckpt, "SOLVER.MAX_ITER", "2", "SOLVER.BASE_LR", "0.0")
    res = run_supervised(cfg, resume=True)

    info = res["supervised"]
    assert info["reinitialised"] == sorted(REINITIALISED_KEYS) and info["num_fresh_keys"] == 0
    assert info["train_images"] == SETTINGS.num_train and not info["resumed"]
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert set(final) == set(state)
    for k in state:
        if k in REINITIALISED_KEYS:
            assert final[k].shape[0] == NUM_PARTS + 1 and state[k].shape[0] == 22
        else:
            assert torch.equal(final[k], state[k]), k
    assert res["parts_miou"]["separate_split"] == 1.0 and res["parts_miou"]["num_eval_images"] == 2

    # Every target list the criterion saw is one training image's GT parts with their part categories.
    gt = _gt_parts_by_image()
    assert len(seen) == 2 and sum(len(s) for s in seen) == 4
    for labels, masks in (t for s in seen for t in s):
        owners = [i for i, (_, m) in gt.items() if m.shape == masks.shape and np.array_equal(m, masks.numpy())]
        assert len(owners) == 1
        assert labels.tolist() == gt[owners[0]][0]
    assert max(max(c) for c, _ in gt.values()) < NUM_PARTS and any(max(c) >= 7 for c, _ in gt.values())

    # Resuming a finished run trains nothing more.
    seen.clear()
    again = run_supervised(cfg, resume=True)
    assert again["supervised"]["resumed"] and seen == []


def _supervised_losses(out_dir, lr, monkeypatch, iters=40):
    """Last-layer class + mask + dice loss of every training iteration of a from-scratch supervised run."""
    seen = []
    original = SetCriterion.forward

    def recording(self, outputs, targets):
        losses = original(self, outputs, targets)
        seen.append(float(sum(losses[k] for k in ("loss_ce", "loss_mask", "loss_dice"))))
        return losses

    monkeypatch.setattr(SetCriterion, "forward", recording)
    seed_all_rng(0)  # the model's initialisation and the sampler's image order
    run_supervised(tiny_cfg(out_dir, "MODEL.WEIGHTS", "", "SOLVER.MAX_ITER", str(iters), "SOLVER.BASE_LR", str(lr)),
                   resume=False)
    monkeypatch.undo()
    assert len(seen) == iters
    return seen


def test_supervised_stage_fits_the_part_labels_and_lr0_does_not(world, monkeypatch):
    # Same seed, same batches: only the learning rate differs. With identity augmentation the 4 images
    # recur every 2 iterations, so the last 10 iterations' loss measures the fit to their part labels.
    learned = _supervised_losses(world / "fit_lr", 1e-3, monkeypatch)
    control = _supervised_losses(world / "fit_lr0", 0.0, monkeypatch)
    assert learned[0] == pytest.approx(control[0], rel=1e-5)  # the same start
    assert np.mean(learned[-10:]) < 0.75 * np.mean(control[-10:]), (learned[-10:], control[-10:])
    assert np.mean(control[-10:]) > 0.9 * np.mean(control[:10])  # without steps the fit does not move


def test_teacher_init_and_bad_configs(world):
    teacher = _IncompatibleKeys(missing_keys=["part_predictor.query_feat.weight", "part_criterion.empty_weight"],
                                unexpected_keys=[], incorrect_shapes=[])
    assert check_initialisation(teacher, "t.pth") == {
        "reinitialised": [], "fresh": ["part_criterion.empty_weight", "part_predictor.query_feat.weight"]}
    other_arch = _IncompatibleKeys(missing_keys=[], unexpected_keys=[], incorrect_shapes=[
        ("part_predictor.class_embed.weight", (57, 128), (15, 128)),
        ("sem_seg_head.predictor.query_feat.weight", (50, 128), (50, 64))])
    with pytest.raises(ValueError, match="sem_seg_head.predictor.query_feat.weight"):
        check_initialisation(other_arch, "x.pth")
    with pytest.raises(ValueError, match="NUM_PART_CLASSES must equal the number of part categories"):
        run_supervised(tiny_cfg(world / "bad", "MODEL.PART_DISTILL.NUM_PART_CLASSES", "13"))
    with pytest.raises(ValueError, match="PART_CLASS_KEY"):
        run_supervised(tiny_cfg(world / "bad", "INPUT.PART_CLASS_KEY", ""))


def test_part_target_dicts_flatten_parts_with_their_categories():
    d = {"file_name": "a.png", "height": 4, "width": 4, "image_id": 7, "annotations": [
        {"category_id": 2, "id": 1, "iscrowd": 0, "segmentation": "o1",
         "parts": [{"category_id": 5, "segmentation": "p1", "id": 11},
                   {"category_id": 9, "segmentation": "p2", "id": 12}]},
        {"category_id": 3, "id": 2, "iscrowd": 1, "segmentation": "o2",
         "parts": [{"category_id": 4, "segmentation": "p3", "id": 13}]},
        {"category_id": 0, "id": 3, "iscrowd": 0, "segmentation": "o3", "parts": []}]}
    [out] = part_target_dicts([d])
    assert {k: out[k] for k in ("file_name", "height", "width", "image_id")} == {
        "file_name": "a.png", "height": 4, "width": 4, "image_id": 7}
    assert out["annotations"] == [
        {"segmentation": "p1", "category_id": 5, "id": 11, "iscrowd": 0, "object_id": 1, "object_category_id": 2},
        {"segmentation": "p2", "category_id": 9, "id": 12, "iscrowd": 0, "object_id": 1, "object_category_id": 2}]


# ---------------------------------------------------------------- the Table-4 writer
def test_few_shot_table_markdown_and_steps(tmp_path):
    results = {"ours": {1.0: {"mIoU": 20.04, "AR@200": 33.25}, 100.0: {"mIoU": 58.6, "AR@200": float("nan")}},
               "teacher": {1.0: {"mIoU": 5.0, "AR@200": 25.3}, 10.0: {"mIoU": 44.44, "AR@200": None},
                           100.0: {"mIoU": 56.0, "AR@200": 49.4}}}
    expected = (
        "**mIoU**\n\n"
        "| Initialisation | Finetune | 1% | 10% | 100% |\n|---|---|---|---|---|\n"
        "| Instance teacher (instance seg.) | pw | 5.0 | 44.4 | 56.0 |\n"
        "| PartDistillation (ours) | pw | 20.0 | n/a | 58.6 |\n\n"
        "**AR@200**\n\n"
        "| Initialisation | Finetune | 1% | 10% | 100% |\n|---|---|---|---|---|\n"
        "| Instance teacher (instance seg.) | pw | 25.3 | n/a | 49.4 |\n"
        "| PartDistillation (ours) | pw | 33.2 | n/a | n/a |\n\n"
        "note\n")
    assert few_shot_markdown(results, [1, 10, 100], "pw", ["note"]) == expected
    assert write_few_shot_table(str(tmp_path), results, [1, 10, 100], "pw", ["note"]) == expected
    assert (tmp_path / "few_shot.md").read_text() == expected
    ckpt = tmp_path / "t.pth"
    ckpt.write_bytes(b"")
    [step] = build_few_shot_steps("o", {"teacher": str(ckpt)}, [10], "c.yaml")
    assert step.done_file == os.path.join("o", "teacher", "pct10", "eval_results.json")
    # yacs rejects an int for the float key: the percentage must be passed as "10.0".
    assert step.argv[step.argv.index("DATASETS.FEW_SHOT.PERCENT") + 1] == "10.0"
    with pytest.raises(FileNotFoundError, match="--ours"):
        build_few_shot_steps("o", {"ours": str(tmp_path / "missing.pth")}, [10])
