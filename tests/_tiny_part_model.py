"""A tiny random-weight PartDistillationModel config shared by the demo and export tests."""
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
