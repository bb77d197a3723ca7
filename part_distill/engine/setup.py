"""Config assembly shared by every entry point (train_net, mine_parts, demo)."""
import difflib
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


class UnknownConfigKeyError(KeyError):
    """A config file or ``opts`` names a key the config does not have (message names the closest one)."""

    def __str__(self):
        return self.args[0]  # KeyError would print the repr of the message


def _flat_keys(node, prefix=""):
    """Dotted names of every leaf under ``node`` (a CfgNode or a plain nested dict)."""
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _flat_keys(v, prefix + k + ".")
        else:
            yield prefix + k


def _closest_key(cfg, key, valid):
    """The valid key most like ``key``: a sibling first (a typo in the last name), else any key."""
    parent, _, leaf = key.rpartition(".")
    node = cfg
    for name in parent.split(".") if parent else ():
        node = node.get(name) if isinstance(node, dict) else None
    if isinstance(node, dict):
        siblings = difflib.get_close_matches(leaf, list(node.keys()), n=1, cutoff=0.6)
        if siblings:
            return f"{parent}.{siblings[0]}" if parent else siblings[0]
    found = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return found[0] if found else None


def check_config_keys(cfg, keys, source):
    """Raise :class:`UnknownConfigKeyError` naming the first of ``keys`` that ``cfg`` lacks and the
    closest valid key; yacs' own error ("Non-existent key: X") gives no hint. Keys detectron2 marks
    deprecated or renamed are left to yacs, which handles them."""
    valid = set(_flat_keys(cfg))
    for key in keys:
        if key in valid or cfg.key_is_deprecated(key) or cfg.key_is_renamed(key):
            continue
        best = _closest_key(cfg, key, sorted(valid))
        hint = f"; did you mean {best!r}?" if best else " (no similar key; see part_distill/config.py)"
        raise UnknownConfigKeyError(f"Unknown config key {key!r}{hint} (in {source})")


def _file_keys(cfg, config_file):
    """Dotted keys a YAML sets, its _BASE_ chain included; empty for an old-version file (detectron2
    upgrades its renamed keys when merging, so its names are not today's)."""
    loaded = cfg.load_yaml_with_base(config_file, allow_unsafe=True)
    if loaded.get("VERSION", cfg.VERSION) < cfg.VERSION:
        return []
    return list(_flat_keys(loaded))


def build_cfg(config_file="", opts=(), freeze=True):
    """detectron2 defaults + part_distill defaults, then ``config_file``, then ``KEY VALUE`` opts.

    An unknown key in the file or in ``opts`` raises :class:`UnknownConfigKeyError` with the closest
    valid key.
    """
    cfg = get_cfg()
    add_part_distill_config(cfg)
    opts = list(opts)
    if config_file:
        check_config_keys(cfg, _file_keys(cfg, config_file), config_file)
        cfg.merge_from_file(config_file)
    check_config_keys(cfg, opts[0::2], "the command-line opts")
    cfg.merge_from_list(opts)
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
