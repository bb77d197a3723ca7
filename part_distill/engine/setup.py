"""Config assembly shared by every entry point (train_net, mine_parts, demo)."""
import logging

import torch
from detectron2.config import get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import STAGES, add_part_distill_config
from ..data.datasets.parts_world import register_parts_world_from_config
from ..data.datasets.image_collection import register_image_collection_from_config
from ..data.few_shot import apply_few_shot_config
from .class_counts import resolve_class_counts


def build_cfg(config_file="", opts=(), freeze=True):
    """detectron2 defaults + part_distill defaults, then ``config_file``, then ``KEY VALUE`` opts.

    Unknown keys in the file or in ``opts`` raise detectron2's "Non-existent config key" error.
    """
    cfg = get_cfg()
    add_part_distill_config(cfg)
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        # detectron2 defaults to cuda; a laptop without one should still run every command.
        logging.getLogger(__name__).warning("MODEL.DEVICE=%s but CUDA is unavailable; using cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    # A collection named by DATASETS.IMAGE_COLLECTION is registered before its metadata is needed.
    register_image_collection_from_config(cfg)
    # Few-shot subsets take effect by renaming DATASETS.TRAIN to registered subsets.
    apply_few_shot_config(cfg)
    resolve_class_counts(cfg)
    stage = cfg.PART_DISTILL.STAGE
    if stage not in STAGES:
        raise ValueError(f"PART_DISTILL.STAGE={stage!r} is not one of {STAGES}")
    if freeze:
        cfg.freeze()
    return cfg


def setup(args):
    """Build the config from parsed ``default_argument_parser`` args and run detectron2's default_setup."""
    cfg = build_cfg(args.config_file, args.opts)
    # Command-line runs honour PARTS_WORLD.* (library users register their own world instead).
    register_parts_world_from_config(cfg)
    default_setup(cfg, args)
    # default_setup configures detectron2's and fvcore's loggers only; ours log stage decisions too.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="part_distill", abbrev_name="pd")
    return cfg
