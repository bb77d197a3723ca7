"""Every YAML under configs/ builds what its command builds (model, mining feature extractor or PARTICLE
model) on CPU at a tiny override size, without weights; class counts set to -1 come from metadata."""
import glob
import json
import os

import pytest
import torch

import part_distill  # noqa: F401  (registers everything)
from conftest import TINY_VOCABULARY
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from part_distill.engine.setup import build_cfg
from part_distill.mining.features import build_feature_extractor
from part_distill.particle.stage import build_particle_model

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
CONFIGS = sorted(os.path.relpath(p, CONFIG_DIR) for p in glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"),
                                                                     recursive=True))
MODEL_ARCHS = ("InstanceSegmentor", "PartDistillationModel", "SupervisedPartModel")
# Small widths / depths every config accepts; weights are never loaded.
TINY = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.EFFICIENTNET.PRETRAINED", "False",
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.DEPTHS", "[1, 1, 1, 1]", "MODEL.SWIN.NUM_HEADS", "[1, 1, 1, 1]",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1", "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_DIM_FEEDFORWARD", "32",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_NHEADS", "2",
    "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.NHEADS", "2", "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "32",
    "MODEL.MASK_FORMER.DEC_LAYERS", "2", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "4",
    "MODEL.PART_DISTILL.NUM_PART_QUERIES", "4", "MODEL.PART_DISTILL.PART_DEC_LAYERS", "2",
    "PARTICLE.PROJ_HIDDEN_DIM", "16", "PARTICLE.PROJ_DIM", "8", "PARTICLE.PRED_HIDDEN_DIM", "16",
]


def _build(rel, vocab):
    # A config naming an image collection registers it with this vocabulary (no-op for the others).
    cfg = build_cfg(os.path.join(CONFIG_DIR, rel), ["DATASETS.IMAGE_COLLECTION.VOCABULARY", vocab] + TINY)
    if cfg.MODEL.META_ARCHITECTURE in MODEL_ARCHS:
        return cfg, build_model(cfg)
    if cfg.PART_DISTILL.STAGE == "particle":
        return cfg, build_particle_model(cfg)
    return cfg, build_feature_extractor(cfg)


@pytest.mark.parametrize("rel", CONFIGS)
def test_config_builds_at_tiny_size(rel, detector_vocabulary):
    vocab = detector_vocabulary
    cfg, model = _build(rel, vocab)
    assert isinstance(model, torch.nn.Module)
    assert sum(p.numel() for p in model.parameters()) > 0
    if "imagenet" in rel and cfg.MODEL.META_ARCHITECTURE == "PartDistillationModel":
        # The ranker (and stage 4's slot head) take their class count from the collection's vocabulary.
        assert cfg.MODEL.PART_DISTILL.NUM_OBJECT_CLASSES == len(TINY_VOCABULARY)
        assert tuple(model.ranker.prototypes.shape[:2]) == (len(TINY_VOCABULARY), 8)
        expected = len(TINY_VOCABULARY) * 8 if cfg.PART_DISTILL.STAGE == "distill" else 1
        assert cfg.MODEL.PART_DISTILL.NUM_PART_CLASSES == expected
    if rel.startswith("few_shot"):
        # The target's part vocabulary and object classes, from its registered metadata.
        meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
        assert cfg.MODEL.PART_DISTILL.NUM_PART_CLASSES == len(meta.part_classes)
        assert cfg.MODEL.PART_DISTILL.NUM_OBJECT_CLASSES == len(meta.thing_classes)
        assert cfg.DATASETS.TEST[0].replace("_val_", "_train_") == cfg.DATASETS.TRAIN[0]


def test_imagenet_configs_start_with_their_command():
    for rel in CONFIGS:
        if not rel.startswith(("imagenet", "zero_shot", "few_shot")) or os.path.basename(rel).startswith("Base-"):
            continue
        with open(os.path.join(CONFIG_DIR, rel)) as f:
            header = []
            for line in f:
                if not line.startswith("#"):
                    break
                header.append(line)
        assert header, rel
        assert any(f"--config-file configs/{rel}" in h for h in header), rel
        assert any("resources" in h.lower() for h in header), rel


def test_sentinel_without_metadata_names_the_key():
    with pytest.raises(ValueError, match="NUM_OBJECT_CLASSES is -1 .* names no dataset"):
        build_cfg("", ["PART_DISTILL.STAGE", "ranking", "MODEL.PART_DISTILL.NUM_OBJECT_CLASSES", "-1",
                       "PART_DISTILL.SELF_TRAIN.DATASETS", "()"])
    with pytest.raises(ValueError, match="NUM_PART_CLASSES is -1 .* 'no_such_dataset' is not registered"):
        build_cfg("", ["PART_DISTILL.STAGE", "supervised", "MODEL.PART_DISTILL.NUM_PART_CLASSES", "-1",
                       "DATASETS.TRAIN", '("no_such_dataset",)'])


def test_sentinels_filled_from_metadata():
    from detectron2.data import DatasetCatalog, MetadataCatalog

    DatasetCatalog.pop("sentinel_parts", None)
    MetadataCatalog.pop("sentinel_parts", None)
    DatasetCatalog.register("sentinel_parts", lambda: [])
    MetadataCatalog.get("sentinel_parts").set(thing_classes=["a", "b"], part_classes=["p", "q", "r", "s", "t"])
    common = ["DATASETS.TRAIN", '("sentinel_parts",)', "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "-1",
              "MODEL.PART_DISTILL.NUM_PART_CLASSES", "-1"]
    cfg = build_cfg("", ["PART_DISTILL.STAGE", "supervised", *common])
    assert (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, cfg.MODEL.PART_DISTILL.NUM_PART_CLASSES) == (2, 5)
    cfg = build_cfg("", ["PART_DISTILL.STAGE", "distill", "PART_DISTILL.SELF_TRAIN.DATASETS", '("sentinel_parts",)',
                         "MODEL.PART_DISTILL.NUM_OBJECT_CLASSES", "-1", "MODEL.PART_DISTILL.CLUSTERS_PER_CLASS", "3",
                         *common])
    assert (cfg.MODEL.PART_DISTILL.NUM_OBJECT_CLASSES, cfg.MODEL.PART_DISTILL.NUM_PART_CLASSES) == (2, 6)
    # 0 keeps the teacher's classes (SEM_SEG_HEAD.NUM_CLASSES) for the slot head.
    cfg = build_cfg("", ["PART_DISTILL.STAGE", "distill", "MODEL.PART_DISTILL.CLUSTERS_PER_CLASS", "3", *common])
    assert cfg.MODEL.PART_DISTILL.NUM_PART_CLASSES == 6
