"""Faults a long run hits on bad input, each reproduced on a 3-image toy set: a truncated training
image, a 16-bit PNG, NaN losses, NaN features / zero PIXEL_STD, an invalid NUM_CLUSTERS and a
labelling round that keeps no part. Each must be a counted skip or a loud error naming the culprit."""
import json
import logging
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from PIL import Image

import part_distill  # noqa: F401  (registers models)
from part_distill.data.image_io import UnreadableImageError
from part_distill.data.mappers import InstanceLSJMapper, build_lsj_augmentation
from part_distill.engine.part_labels import (PartLabelFilters, build_label_mapper, label_run_info,
                                            write_part_label_store)
from part_distill.engine.setup import build_cfg
from part_distill.engine.trainer import PartDistillTrainer
from part_distill.mining import miner as miner_mod
from part_distill.mining.features import RGBXYFeatures
from part_distill.mining.kmeans import BatchedKMeans
from part_distill.mining.miner import PartMiner, mine_parts
from part_distill.mining.object_sources import GTObjectSource
from part_distill.mining.store import EmptyStoreError, PartStore
from part_distill.utils.masks import encode_rle
from _tiny_part_model import tiny_part_cfg

SIZE = 64
GOOD, WITH_BAD = "robust_inputs_good", "robust_inputs_with_truncated"


def _image(seed):
    """A noisy image with one bright box (the object of its annotation)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, size=(SIZE, SIZE, 3), dtype=np.uint8)
    box = np.zeros((SIZE, SIZE), bool)
    box[8 + 4 * seed:40, 10:50] = True
    img[box] += 150
    return img, box


def _dict(path, box, i):
    return {"file_name": str(path), "height": SIZE, "width": SIZE, "image_id": i,
            "annotations": [{"id": i * 10 + 1, "category_id": 0, "iscrowd": 0, "bbox": [10, 8, 40, 32],
                             "bbox_mode": 1, "segmentation": encode_rle(box)}]}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """GOOD: 2 readable images; WITH_BAD: the same plus a PNG cut in half (truncated mid-stream)."""
    root = tmp_path_factory.mktemp("robust")
    dicts = []
    for i in range(3):
        img, box = _image(i)
        path = root / f"img{i}.png"
        Image.fromarray(img).save(path)
        dicts.append(_dict(path, box, i))
    bad = root / "img2.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    for name, ds in ((GOOD, dicts[:2]), (WITH_BAD, dicts)):
        DatasetCatalog.pop(name, None)
        MetadataCatalog.pop(name, None)
        DatasetCatalog.register(name, lambda ds=ds: [dict(d) for d in ds])
        MetadataCatalog.get(name).set(thing_classes=["box"])
    yield {"root": root, "dicts": dicts, "bad": str(bad)}
    for name in (GOOD, WITH_BAD):
        DatasetCatalog.pop(name, None)
        MetadataCatalog.pop(name, None)


# ---------------------------------------------------------------- training reads
def test_16bit_png_reads_the_same_in_training_as_in_mining(tmp_path):
    # A 16-bit grayscale ramp: detectron2's reader clips it to 255 (an all-white image); ours keeps
    # the high byte, as mining does.
    ramp = (np.arange(SIZE * SIZE, dtype=np.uint32).reshape(SIZE, SIZE) * 16).astype(np.uint16)
    path = tmp_path / "deep.png"
    assert cv2.imwrite(str(path), ramp)
    assert Image.open(path).mode.startswith("I")  # PIL sees a 16-bit image, not an 8-bit one
    expected = np.repeat((ramp >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
    d = {"file_name": str(path), "height": SIZE, "width": SIZE, "image_id": 0, "annotations": []}
    # Identity augmentation: scale 1, crop = image, no flip.
    mapper = InstanceLSJMapper(True, augmentations=build_lsj_augmentation(SIZE, 1.0, 1.0, flip=""),
                               image_format="RGB")
    got = mapper(d)["image"].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, expected)
    assert got.max() == 255 and got.min() == 0 and (got == 255).mean() < 0.01
    mined, reason = PartMiner._read(None, d)  # the miner's reader (it uses no miner state)
    assert reason is None
    np.testing.assert_array_equal(mined, got)


def _train_cfg(out_dir, dataset, *opts):
    return build_cfg("", [
        "MODEL.META_ARCHITECTURE", "InstanceSegmentor", "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
        "MODEL.BACKBONE.NAME", "build_efficientnet_lite_backbone", "MODEL.EFFICIENTNET.PRETRAINED", "False",
        "MODEL.PIXEL_MEAN", "[127.5, 127.5, 127.5]", "MODEL.PIXEL_STD", "[127.5, 127.5, 127.5]",
        "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "FPNPixelDecoder", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "1",
        "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32", "MODEL.SEM_SEG_HEAD.NORM", "GN",
        "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.NHEADS", "2",
        "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64", "MODEL.MASK_FORMER.DEC_LAYERS", "2",
        "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "4", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "64",
        "INPUT.FORMAT", "RGB", "INPUT.IMAGE_SIZE", str(SIZE), "INPUT.MIN_SCALE", "1.0", "INPUT.MAX_SCALE", "1.0",
        "INPUT.RANDOM_FLIP", "none", "DATASETS.TRAIN", f'("{dataset}",)', "DATASETS.TEST", "()",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "3", "SOLVER.BASE_LR", "0.0001", "SOLVER.STEPS", "()",
        "SOLVER.WARMUP_ITERS", "0", "SOLVER.CHECKPOINT_PERIOD", "1000", "TEST.EVAL_PERIOD", "0", "SEED", "0",
        "OUTPUT_DIR", str(out_dir), *opts])


@pytest.fixture
def log_file(tmp_path):
    """part_distill's log records, also those of forked DataLoader workers (they inherit the handler)."""
    path = tmp_path / "log.txt"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(process)d %(name)s %(levelname)s %(message)s"))
    log = logging.getLogger("part_distill")
    old_level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    yield path
    log.removeHandler(handler)
    handler.close()
    log.setLevel(old_level)


def test_truncated_training_image_is_skipped_counted_and_named(toy, tmp_path, log_file):
    # 2 DataLoader worker processes: the count must add up across them.
    trainer = PartDistillTrainer(_train_cfg(tmp_path / "out", WITH_BAD, "DATALOADER.NUM_WORKERS", "2"))
    trainer.resume_or_load(resume=False)
    trainer.train()  # before: OSError "image file is truncated" from a worker, file not named
    assert trainer.iter == 3
    # 3 iterations x 2 images = the first 6 indices of the sampler's shuffled stream = two passes over the
    # 3 images, so the truncated one was drawn (and skipped) at least twice.
    skipped = trainer.storage.history("data/skipped_images").latest()
    assert skipped >= 2
    with open(tmp_path / "out" / "metrics.json") as f:
        metrics = [json.loads(line) for line in f]
    assert metrics[-1]["iteration"] == 2 and metrics[-1]["data/skipped_images"] >= 2
    log = log_file.read_text()
    warned = [line for line in log.splitlines() if "Skipping unreadable training image" in line]
    assert warned and all(toy["bad"] in line and "truncated" in line for line in warned)
    # Logged and counted in the worker processes, summed in the trainer's process.
    assert {int(line.split()[0]) for line in warned} - {os.getpid()}
    assert f"Training skipped {int(skipped)} unreadable image read(s)" in log


def test_unreadable_image_at_test_time_raises_naming_it(toy):
    mapper = InstanceLSJMapper(_train_cfg("/nonexistent", GOOD), False)
    with pytest.raises(UnreadableImageError, match="img2.png"):
        mapper(toy["dicts"][2])


def test_non_finite_loss_stops_training_naming_iteration_and_loss(toy, tmp_path):
    trainer = PartDistillTrainer(_train_cfg(tmp_path / "out", GOOD, "DATALOADER.NUM_WORKERS", "0"))
    trainer.resume_or_load(resume=False)
    model = trainer.model
    forward = model.forward
    before_bad_step = {}

    def nan_dice_at_iteration_1(batched_inputs):
        losses = forward(batched_inputs)
        if trainer.iter == 1:
            before_bad_step.update({k: v.detach().clone() for k, v in model.state_dict().items()})
            losses["loss_dice"] = losses["loss_dice"] * float("nan")
        return losses

    model.forward = nan_dice_at_iteration_1
    with pytest.raises(FloatingPointError, match=r"Non-finite loss at iteration 1: loss_dice=nan\. "):
        trainer.train()
    # Stopped before the optimizer step: the weights are those the NaN iteration started from.
    after = model.state_dict()
    assert before_bad_step and all(torch.equal(after[k], v) for k, v in before_bad_step.items())


# ---------------------------------------------------------------- degenerate mining
def _mine_cfg(out_dir, *opts):
    return build_cfg("", ["MODEL.DEVICE", "cpu", "MINING.FEATURES", "rgbxy", "MINING.IMAGE_SIZE", str(SIZE),
                          "MINING.NUM_CLUSTERS", "2", "MINING.METRIC", "l2", "MINING.DATASETS", f'("{GOOD}",)',
                          "MINING.OUTPUT_DIR", str(out_dir), *opts])


class _AllNaN(RGBXYFeatures):
    """What a zero PIXEL_STD does to backbone features: every value NaN."""

    def forward(self, images):
        return super().forward(images) * float("nan")


def _nan_miner(policy):
    return PartMiner(object_source=GTObjectSource(), feature_extractor=_AllNaN(stride=8),
                     kmeans=BatchedKMeans(num_clusters=2, metric="l2", nan_policy=policy), image_size=SIZE)


def test_nan_features_fail_loudly(toy, tmp_path):
    # Default MINING.NAN_POLICY "raise": the first object with NaN features stops mining, naming its image.
    with pytest.raises(ValueError, match="non-finite features for object 0 of .*img0.png"):
        mine_parts(_mine_cfg(tmp_path / "raise"), miner=_nan_miner("raise"))
    # "skip": every object is skipped, so the store has 0 parts: an error with the counts, no manifest
    # (a later stage must not train on it), and the same error on a rerun.
    for _ in range(2):
        with pytest.raises(EmptyStoreError, match=r"0 parts in 1 shard.*'nan_features': 2"):
            mine_parts(_mine_cfg(tmp_path / "skip", "MINING.NAN_POLICY", "skip"), miner=_nan_miner("skip"))
        assert not os.path.exists(tmp_path / "skip" / PartStore.MANIFEST)


def _no_backbone(cfg):
    raise AssertionError("the feature extractor (backbone) was built before the config was validated")


@pytest.mark.parametrize("opts,message", [
    (["MINING.NUM_CLUSTERS", "0"], "MINING.NUM_CLUSTERS must be an integer >= 1, got 0"),
    (["MODEL.PIXEL_STD", "[0.0, 0.0, 0.0]"], r"MODEL.PIXEL_STD must be > 0"),
    (["MINING.NAN_POLICY", "ignore"], "MINING.NAN_POLICY must be one of"),
    (["MINING.SHARD_SIZE", "0"], "MINING.SHARD_SIZE must be an integer >= 1"),
])
def test_invalid_mining_config_is_rejected_before_loading_and_stamping(toy, tmp_path, monkeypatch, opts, message):
    monkeypatch.setattr(miner_mod, "build_feature_extractor", _no_backbone)
    cfg = _mine_cfg(tmp_path / "store", "MINING.FEATURES", "res3_res4", *opts)
    with pytest.raises(ValueError, match=message):
        mine_parts(cfg)
    assert not os.path.exists(tmp_path / "store" / PartStore.RUN)


# ---------------------------------------------------------------- self-training labels
@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    cfg = tiny_part_cfg("MODEL.PART_DISTILL.OBJECTS", "gt")
    return cfg, build_model(cfg).eval()


def _label(teacher, toy, out_dir, score_thresh):
    cfg, model = teacher
    dicts = [dict(d, _mining_dataset=WITH_BAD) for d in toy["dicts"]]
    info = label_run_info({"score_thresh": score_thresh}, [{"name": WITH_BAD, "num_images": len(dicts)}])
    return write_part_label_store(model, dicts, str(out_dir), info, mapper=build_label_mapper(cfg),
                                  filters=PartLabelFilters(score_thresh, 0.0), shard_size=8, batch_size=2)


def test_label_round_skips_an_unreadable_image_and_counts_it(teacher, toy, tmp_path):
    manifest = _label(teacher, toy, tmp_path / "labels", score_thresh=0.0)  # before: OSError, file not named
    assert manifest["counts"]["images"] == 2 and manifest["counts"]["images_skipped"] == {"unreadable_image": 1}
    assert manifest["counts"]["parts"] > 0
    shard = PartStore(tmp_path / "labels").read_shard(0)
    assert [s["file_name"] for s in shard["skipped_images"]] == [toy["bad"]]
    assert [im["id"] for im in shard["images"]] == [1, 2]


def test_label_round_with_no_kept_part_fails_loudly(teacher, toy, tmp_path):
    # A part is kept when its score (< 1: a probability times a mask quality) exceeds the threshold, so
    # 1.0 keeps nothing. Before, this wrote a manifest of 0 parts and the student trained on an empty set.
    with pytest.raises(EmptyStoreError, match=r"Part labels: .*0 parts.*SCORE_THRESH"):
        _label(teacher, toy, tmp_path / "labels", score_thresh=1.0)
    assert not os.path.exists(tmp_path / "labels" / PartStore.MANIFEST)


@pytest.mark.parametrize("opts,message", [
    (["PART_DISTILL.SELF_TRAIN.SHARD_SIZE", "0"], "SELF_TRAIN.SHARD_SIZE must be an integer >= 1"),
    (["PART_DISTILL.SELF_TRAIN.OBJECTS", "detected"], "SELF_TRAIN.OBJECTS must be one of"),
    (["PART_DISTILL.SELF_TRAIN.SCORE_THRESH", "30.0"], r"SELF_TRAIN.SCORE_THRESH must lie in \[0, 1\]"),
])
def test_invalid_self_training_config_is_rejected_before_the_teacher_loads(tmp_path, monkeypatch, opts, message):
    from part_distill.engine import self_training

    def no_teacher(*args):
        raise AssertionError("the teacher was built before the config was validated")

    monkeypatch.setattr(self_training, "build_teacher", no_teacher)
    cfg = build_cfg("", ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "teacher.pth", "OUTPUT_DIR", str(tmp_path), *opts])
    with pytest.raises(ValueError, match=message):
        self_training.run_rounds(cfg, stage="self_train", num_rounds=1)
    assert not any(tmp_path.iterdir())  # nothing stamped
