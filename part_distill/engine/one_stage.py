"""The one-stage self-training baseline of PartDistillation (Sec 5 "Baselines" (2)).

Instead of mining parts per instance and learning which parts belong to which class afterwards
(stages 2-4), one k-means per object class over the pixels of all its instances (a store mined
with ``MINING.LEVEL "dataset"`` and NUM_CLUSTERS = CLUSTERS_PER_CLASS) labels every part with a
class slot c*k + cluster from the start. The slot-head model trains on those labels
(``OUTPUT_DIR/init``), then PART_DISTILL.ONE_STAGE.ROUNDS self-training rounds relabel with the
previous student's own slot head (``OUTPUT_DIR/round_<r>``), as stage 4 does after its round 0.
"""
import logging
import os

from ..data.fingerprint import check_store_sources
from ..data.pseudo_labels import PseudoLabelFilters, check_cluster_store, register_pseudo_labels
from ..mining.store import read_manifest
from .self_training import check_slot_head, run_rounds, with_overrides
from .slot_labelers import SlotHeadLabeler  # the stage-4 labeler of rounds > 0, shared
from .trainer import PartDistillTrainer

__all__ = ["run_one_stage"]

logger = logging.getLogger(__name__)


def _mined_clusters(cfg):
    """(manifest path, manifest, k) of the dataset-level store the baseline trains on; checks the config."""
    k = check_slot_head(cfg, "one_stage")
    path = cfg.PART_DISTILL.PSEUDO_LABELS.MANIFEST
    if not path:
        raise ValueError("stage 'one_stage' needs PART_DISTILL.PSEUDO_LABELS.MANIFEST: a store mined by "
                         "tools/mine_parts.py with MINING.LEVEL dataset")
    manifest = read_manifest(path)
    check_cluster_store(manifest, k)
    check_store_sources(manifest, path)
    return path, manifest, k


def train_initial(cfg, path, manifest, k, resume=True):
    """The slot-head student on the dataset-level clusters of the store ``path``; returns its final checkpoint."""
    name = register_pseudo_labels(f"mined_clusters_{manifest['config_hash']}_k{k}", path,
                                  PseudoLabelFilters.from_config(cfg), cluster_slots=k)
    init_dir = os.path.join(cfg.OUTPUT_DIR, "init")
    final = os.path.join(init_dir, "model_final.pth")
    if os.path.isfile(final):
        logger.info("one-stage initial training already finished (%s), skipped", final)
        return final
    trainer = PartDistillTrainer(with_overrides(cfg, **{"DATASETS.TRAIN": (name,), "OUTPUT_DIR": init_dir,
                                                       "DATASETS.TEST": ()}))
    trainer.resume_or_load(resume=resume)
    if trainer.start_iter < trainer.max_iter:
        trainer.train()
    return final


def run_one_stage(cfg, resume=True):
    """Initial training on dataset-level cluster ids, then ROUNDS slot-head self-training rounds.

    Returns the last round's manifest (as ``run_rounds``), whose ``eval`` holds the evaluation
    on DATASETS.TEST when it ran."""
    path, manifest, k = _mined_clusters(cfg)
    init = train_initial(cfg, path, manifest, k, resume=resume)
    rounds = cfg.PART_DISTILL.ONE_STAGE.ROUNDS
    if rounds == 0:
        return {"checkpoint": init, "eval": {}}
    return run_rounds(with_overrides(cfg, **{"MODEL.WEIGHTS": init}), stage="one_stage", num_rounds=rounds,
                      labeler_factory=lambda teacher, r: SlotHeadLabeler(k))
