"""The part decoder learns its targets (issue 13's control-backed test of learning).

On 8 training images of a tiny parts world, the object-centric part model with its part pixel
decoder (the shipped default: MODEL.PART_DISTILL.FREEZE part_branch, OBJECT_CROP on) trains on the
images' part masks as single-class targets; its fit (evaluation/fit.py: mean best IoU of its masks
with each target) must reach 0.7. The same run at learning rate 0 must stay below 0.3: the fit
measure can fail, and it is the training that moves it.
"""
import json
import os

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

import part_distill  # noqa: F401  (registers datasets and models)
from part_distill.data.parts_world import WorldSettings
from part_distill.drivers.learning_ablation import (DEFAULT_VARIANT, ablation_rows, build_ablation_steps,
                                                  write_ablation_table)
from part_distill.drivers.pipeline import record_timings
from part_distill.engine.supervised import part_target_dicts
from part_distill.engine.trainer import PartDistillTrainer
from part_distill.evaluation.fit import best_ious, fit_summary, fit_to_pseudo_labels
from test_self_training import tiny_cfg

SETTINGS = WorldSettings(num_train=8, num_val=2, image_size=96, max_objects=2)
ITERS = 300


@pytest.fixture(scope="module")
def targets(tiny_world_factory):
    tiny_world_factory(SETTINGS)
    # The GT parts as single-class "part" targets (what a store of perfect pseudo-labels would hold).
    dicts = part_target_dicts(DatasetCatalog.get("parts_world_train_parts"))
    for d in dicts:
        for a in d["annotations"]:
            a["category_id"] = 0
    name = "learning_test_targets"
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=["part"])
    yield name, dicts
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _train_and_fit(tmp_path, dataset, dicts, lr):
    cfg = tiny_cfg(
        tmp_path, "DATASETS.TRAIN", f"('{dataset}',)", "MODEL.PART_DISTILL.FREEZE", "part_branch",
        "MODEL.PART_DISTILL.OBJECT_CROP.ENABLED", "True", "MODEL.PART_DISTILL.OBJECT_CROP.SIZE", "64",
        "MODEL.EFFICIENTNET.PRETRAINED", "True", "MODEL.EFFICIENTNET.NORM", "FrozenBN",
        "MODEL.SEM_SEG_HEAD.CONVS_DIM", "64", "MODEL.SEM_SEG_HEAD.MASK_DIM", "64",
        "MODEL.MASK_FORMER.HIDDEN_DIM", "64", "MODEL.MASK_FORMER.DEC_LAYERS", "3",
        "MODEL.PART_DISTILL.NUM_PART_QUERIES", "16", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "1024",
        "INPUT.IMAGE_SIZE", "96", "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96",
        "SOLVER.IMS_PER_BATCH", "4", "SOLVER.BASE_LR", str(lr), "SOLVER.MAX_ITER", str(ITERS),
        "SOLVER.CHECKPOINT_PERIOD", "100000", "SOLVER.WARMUP_ITERS", "0", "PART_DISTILL.FIT.NUM_IMAGES", "8")
    torch.manual_seed(0)
    trainer = PartDistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return fit_to_pseudo_labels(trainer.model, cfg, dicts, num_images=8)


def test_best_iou_and_summary_hand_computed():
    q = torch.zeros(2, 4, 4, dtype=torch.bool)
    q[0, :2] = True  # rows 0-1
    q[1, :, :1] = True  # column 0
    t = torch.zeros(2, 4, 4, dtype=torch.bool)
    t[0, :1] = True  # row 0: IoU 4/8 with q0, 1/7 with q1
    t[1, :, :2] = True  # columns 0-1: IoU 4/8 with q1, 4/12 with q0
    assert best_ious(q, t).tolist() == pytest.approx([0.5, 0.5])
    assert best_ious(q[:0], t).tolist() == [0.0, 0.0]
    s = fit_summary([0.2, 0.6, 0.9, 0.5])
    assert s["mean_best_iou"] == pytest.approx(0.55) and s["frac_above_0.5"] == pytest.approx(50.0)


@pytest.mark.slow
def test_part_decoder_fits_its_targets_and_the_control_does_not(tmp_path, targets):
    dataset, dicts = targets
    learned = _train_and_fit(tmp_path / "lr", dataset, dicts, 1e-3)
    control = _train_and_fit(tmp_path / "lr0", dataset, dicts, 0.0)
    assert learned["num_images"] == 8 and learned["num_targets"] >= 16
    assert learned["mean_best_iou"] >= 0.7, learned
    assert control["mean_best_iou"] < 0.3, control


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def test_ablation_steps_and_table_read_what_the_stages_wrote(tmp_path, monkeypatch):
    demo, out = str(tmp_path / "demo"), str(tmp_path / "abl")
    with pytest.raises(FileNotFoundError, match="make demo"):
        build_ablation_steps(out, demo, ["previous"])
    _write(os.path.join(demo, "instance_teacher", "model_final.pth"), {})
    _write(os.path.join(demo, "mined_train", "manifest.json"), {})
    steps = build_ablation_steps(out, demo, ["previous", DEFAULT_VARIANT])
    assert [s.name for s in steps] == [f"{v}.{st}" for v in ("previous", DEFAULT_VARIANT)
                                       for st in ("proposal", "self_train", "ranking", "distill", "eval_distill_pred")]
    # A variant's overrides reach every stage and its predicted-object evaluation; the default row is the
    # demo's own stages.
    assert all("encoder" in s.argv for s in steps[:5]) and steps[0].done_file.startswith(out)
    assert steps[5].done_file == os.path.join(demo, "proposal", "eval_results.json")
    assert steps[9].done_file == os.path.join(demo, "eval", "distill_pred", "eval_results.json")
    with pytest.raises(ValueError, match="unknown ablation variants"):
        build_ablation_steps(out, demo, ["nope"])
    r = os.path.join(out, "previous")
    _write(os.path.join(r, "proposal", "eval_results.json"),
           {"parts_ar": {"AR@200-gtobj_union": 3.5}, "fit": {"mean_best_iou": 0.24}})
    _write(os.path.join(r, "self_train", "round_1", "round.json"), {"eval": {"parts_ar": {"AR@200-gtobj_union": 3.3}}})
    _write(os.path.join(r, "distill", "eval_results.json"),
           {"parts_ar": {"AR@200-gtobj_union": 4.7}, "parts_miou": {"mIoU": 20.0}, "parts_nmi_ari": {"NMI": 10.5, "ARI": 5.8}})
    _write(os.path.join(r, "eval", "distill_pred", "eval_results.json"),
           {"parts_ar": {"AR@200": 3.0}, "parts_miou": {"mIoU": 18.0}})
    record_timings(out, {"previous.proposal": 60.0, "previous.self_train": 120.0, "previous.ranking": "skipped"})
    record_timings(demo, {"proposal": 30.0, "distill": 30.0})
    rows = dict(ablation_rows(out, ["previous", DEFAULT_VARIANT], demo))
    assert rows["previous"] == {"fit IoU (train)": 0.24, "AR@200 stage 2": 3.5, "AR@200 self-training r2": 3.3,
                                "AR@200 stage 4": 4.7, "mIoU stage 4": 20.0, "NMI": 10.5, "ARI": 5.8,
                                "AR@200 stage 4 pred. obj.": 3.0, "mIoU stage 4 pred. obj.": 18.0,
                                "CPU min": pytest.approx(3.0)}
    assert rows[DEFAULT_VARIANT]["CPU min"] == pytest.approx(1.0) and rows[DEFAULT_VARIANT]["AR@200 stage 2"] is None
    import matplotlib.axes

    points, real_scatter = [], matplotlib.axes.Axes.scatter

    def record(self, x, y, *args, **kwargs):
        points.append((x, y))
        return real_scatter(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", record)
    text = write_ablation_table(out, demo, ["previous"])
    # the trade-off plot has the variant's point (CPU minutes, stage-4 AR@200) and is a real PNG
    assert points == [(pytest.approx(3.0), 4.7)]
    with open(os.path.join(out, "tradeoff.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| previous |" in text and "| 0.24 | 3.5 | 3.3 | 4.7 | 20.0 | 10.5 | 5.8 | 3.0 | 18.0 | 3.0 |" in text
