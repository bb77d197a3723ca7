"""Tiny random-weight PartDistillationModel configs shared by the tests."""
from part_distill.engine.setup import build_cfg


def tiny_part_opts(size=64):
    """KEY VALUE config overrides of the tiny model (also usable on a command line)."""
    return [
        "MODEL.META_ARCHITECTURE", "PartDistillationModel", "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
        "MODEL.BACKBONE.NAME", "build_efficientnet_lite_backbone", "MODEL.EFFICIENTNET.PRETRAINED", "False",
        "MODEL.PIXEL_MEAN", "[127.5, 127.5, 127.5]", "MODEL.PIXEL_STD", "[127.5, 127.5, 127.5]",
        "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "FPNPixelDecoder", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3",
        "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32", "MODEL.SEM_SEG_HEAD.NORM", "GN",
        "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.NHEADS", "2",
        "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64", "MODEL.MASK_FORMER.DEC_LAYERS", "3",
        "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "6", "MODEL.PART_DISTILL.NUM_PART_QUERIES", "8",
        "MODEL.PART_DISTILL.PART_DEC_LAYERS", "2", "TEST.DETECTIONS_PER_IMAGE", "5",
        "INPUT.FORMAT", "RGB", "INPUT.MIN_SIZE_TEST", str(size), "INPUT.MAX_SIZE_TEST", str(size),
    ]


def tiny_part_cfg(*opts, size=64):
    return build_cfg("", tiny_part_opts(size) + list(opts))


def tiny_world_part_opts(out, weights):
    """KEY VALUE overrides of a tiny part model trained on the tiny parts world's train split
    (self-training labels at any score, one image per shard), writing to ``out``: the kill-resume and
    multi-process tests' shared setup."""
    return [
        "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(out),
        "MODEL.DEVICE", "cpu", "MODEL.META_ARCHITECTURE", "PartDistillationModel",
        "MODEL.BACKBONE.NAME", "build_efficientnet_lite_backbone", "MODEL.EFFICIENTNET.PRETRAINED", "False",
        "MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.PIXEL_MEAN", "[127.5, 127.5, 127.5]",
        "MODEL.PIXEL_STD", "[127.5, 127.5, 127.5]", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "7",
        "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "FPNPixelDecoder", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
        "MODEL.SEM_SEG_HEAD.MASK_DIM", "32", "MODEL.SEM_SEG_HEAD.NORM", "GN",
        "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.NHEADS", "2",
        "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64", "MODEL.MASK_FORMER.DEC_LAYERS", "2",
        "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "4", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "64",
        "MODEL.PART_DISTILL.NUM_PART_QUERIES", "6", "INPUT.FORMAT", "RGB", "INPUT.IMAGE_SIZE", "64",
        "INPUT.MIN_SCALE", "0.8", "INPUT.MAX_SCALE", "1.2", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "64", "INPUT.DATASET_MAPPER_NAME", "PartTargetLSJMapper",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.STEPS", "()",
        "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()",
        "PART_DISTILL.SELF_TRAIN.DATASETS", '("parts_world_train",)',
        "PART_DISTILL.SELF_TRAIN.SHARD_SIZE", "1", "PART_DISTILL.SELF_TRAIN.BATCH_SIZE", "1",
        "PART_DISTILL.SELF_TRAIN.SCORE_THRESH", "0.0", "DATASETS.PSEUDO_LABELS.MAX_PART_AREA_RATIO", "1.0",
        "SEED", "0",
    ]
