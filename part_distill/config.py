"""Every configuration default of part_distill, one documented line per key.

``add_part_distill_config(cfg)`` extends a detectron2 ``CfgNode`` (from ``get_cfg()``).
Keys are grouped by the package that reads them; a YAML that names a key not listed here is
rejected by detectron2's ``merge_from_file`` ("Non-existent config key"), which is what we want.
"""
from detectron2.config import CfgNode as CN

STAGES = (
    "instance",        # train the instance teacher (object masks + classes) on instance labels
    "proposal",        # stage 2: class-agnostic part decoder on mined part pseudo-labels
    "self_train",      # stage 2b: self-training rounds, teacher refreshed from the student
    "ranking",         # stage 3: per-class k-means prototypes over part query features
    "distill",         # stage 4: final self-training with per-class cluster ids as labels
    "supervised",      # few-shot fine-tuning on real part labels
    "particle",        # part-awareness lab: PARTICLE backbone adaptation
)


def add_part_distill_config(cfg):
    """Add every part_distill key (with its default) to ``cfg`` in place and return it."""
    _add_data_config(cfg)
    _add_model_config(cfg)
    _add_mining_config(cfg)
    _add_training_config(cfg)
    _add_eval_config(cfg)
    return cfg


# ---------------------------------------------------------------- data (part_distill/data)
def _add_data_config(cfg):
    cfg.PART_DISTILL = CN()
    # Which pipeline stage this config runs; explicit, never inferred from dataset names.
    cfg.PART_DISTILL.STAGE = "instance"
    # Free-form run name, written into every manifest this run produces.
    cfg.PART_DISTILL.RUN_NAME = ""

    cfg.PARTS_WORLD = CN()
    # Seed of the synthetic parts world; the same seed always yields byte-identical files.
    cfg.PARTS_WORLD.SEED = 0
    # Number of images in parts_world_train / parts_world_val.
    cfg.PARTS_WORLD.NUM_TRAIN = 400
    cfg.PARTS_WORLD.NUM_VAL = 100
    # Square image side in pixels.
    cfg.PARTS_WORLD.IMAGE_SIZE = 192
    # Where the generated world lives, relative to $DETECTRON2_DATASETS.
    cfg.PARTS_WORLD.ROOT = "parts_world"

    cfg.DATASETS.FEW_SHOT = CN()
    # Percentage (1/5/10/20/50/100) of each training set's images to keep; 100 keeps all.
    cfg.DATASETS.FEW_SHOT.PERCENT = 100.0
    # Seed of the (nested) few-shot image shuffle.
    cfg.DATASETS.FEW_SHOT.SEED = 0
    # Balance the kept images across object classes instead of a plain prefix of the shuffle.
    cfg.DATASETS.FEW_SHOT.BALANCED = False


# ---------------------------------------------------------------- model (part_distill/modeling)
def _add_model_config(cfg):
    pass


# ---------------------------------------------------------------- mining (part_distill/mining)
def _add_mining_config(cfg):
    pass


# ---------------------------------------------------------------- training (part_distill/engine)
def _add_training_config(cfg):
    pass


# ---------------------------------------------------------------- evaluation (part_distill/evaluation)
def _add_eval_config(cfg):
    pass
