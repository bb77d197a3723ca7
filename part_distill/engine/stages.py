"""One runner per training stage of PartDistillation, chosen by ``cfg.PART_DISTILL.STAGE``.

    proposal    D^p as a single-class instance segmenter on a mined store (Sec 4.2)
    self_train  R self-training rounds, teacher = snapshot or EMA of the student (Sec 3, 4.2)
    ranking     per-class prototypes of candidate query features, installed in model.ranker (Sec 4.3)
    distill     final self-training with cluster-slot labels c*k + j (Sec 4.3)

Each runner is called on every rank (tools/train_net.py launches them) and returns the results of
evaluating the final model on DATASETS.TEST (empty dict when TEST has no dataset).
"""
import logging
import os

from detectron2.utils import comm

from ..data.fingerprint import check_store_sources
from ..data.pseudo_labels import PseudoLabelFilters, register_pseudo_labels
from ..mining.store import read_manifest
from ..particle.stage import run_particle
from ..utils.io import atomic_write_json
from .one_stage import run_one_stage
from .ranking_stage import run_ranking
from .self_training import check_slot_head, measure_fit, run_rounds, with_overrides
from .slot_labelers import RankerLabeler, SlotHeadLabeler
from .stage_eval import evaluate_stage, load_final_model
from .supervised import run_supervised
from .trainer import PartDistillTrainer

__all__ = ["STAGE_RUNNERS", "run_stage", "run_proposal", "run_self_train", "run_ranking_stage", "run_distill",
           "RankerLabeler", "SlotHeadLabeler"]

logger = logging.getLogger(__name__)

PART_MAPPER = "PartTargetLSJMapper"
PART_META_ARCH = "PartDistillationModel"


def _check_part_model(cfg, stage):
    if cfg.MODEL.META_ARCHITECTURE != PART_META_ARCH:
        raise ValueError(f"stage {stage!r} trains the part decoder: MODEL.META_ARCHITECTURE must be "
                         f"{PART_META_ARCH!r}, got {cfg.MODEL.META_ARCHITECTURE!r}")
    if stage != "ranking" and cfg.INPUT.DATASET_MAPPER_NAME != PART_MAPPER:
        raise ValueError(f"stage {stage!r} trains on part targets: INPUT.DATASET_MAPPER_NAME must be "
                         f"{PART_MAPPER!r}, got {cfg.INPUT.DATASET_MAPPER_NAME!r}")


def run_proposal(cfg, resume=False):
    """Stage 2: train D^p on the mined store PART_DISTILL.PSEUDO_LABELS.MANIFEST (encoder frozen,
    initialised from the instance teacher MODEL.WEIGHTS; D^p's keys are missing there, as expected)."""
    _check_part_model(cfg, "proposal")
    path = cfg.PART_DISTILL.PSEUDO_LABELS.MANIFEST
    if not path:
        raise ValueError("stage 'proposal' needs PART_DISTILL.PSEUDO_LABELS.MANIFEST: the manifest.json "
                         "(or directory) of a store written by tools/mine_parts.py")
    manifest = read_manifest(path)
    check_store_sources(manifest, path)  # the store's datasets are still the versions it was mined from
    name = register_pseudo_labels(f"mined_parts_{manifest['config_hash']}", path, PseudoLabelFilters.from_config(cfg))
    cfg = with_overrides(cfg, **{"DATASETS.TRAIN": (name,)})
    trainer = PartDistillTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    if trainer.start_iter < trainer.max_iter:
        trainer.train()
    # The trainer's EvalHook has evaluated the final model when training ran; don't do it twice.
    res = dict(getattr(trainer, "_last_eval_results", None) or evaluate_stage(cfg, trainer.model))
    fit = measure_fit(cfg, trainer.model, name)
    if fit is not None:
        res["fit"] = fit
    return res


def run_self_train(cfg, resume=True):
    """Stage 2b: PART_DISTILL.SELF_TRAIN.ROUNDS rounds from MODEL.WEIGHTS (the proposal model)."""
    _check_part_model(cfg, "self_train")
    if cfg.MODEL.PART_DISTILL.NUM_PART_CLASSES != 1:
        raise ValueError("stage 'self_train' trains the class-agnostic head: MODEL.PART_DISTILL.NUM_PART_CLASSES must be 1")
    info = run_rounds(cfg, stage="self_train", num_rounds=cfg.PART_DISTILL.SELF_TRAIN.ROUNDS)
    return info.get("eval") or evaluate_stage(cfg, load_final_model(cfg, info["checkpoint"]))


def run_ranking_stage(cfg, resume=True):
    """Stage 3: fit the class-specific ranker of the MODEL.WEIGHTS model; saves OUTPUT_DIR/model_final.pth."""
    _check_part_model(cfg, "ranking")
    model, report = run_ranking(cfg, resume=resume)
    res = evaluate_stage(cfg, model)
    return dict(res, ranking=report) if res else {"ranking": report}


def run_distill(cfg, resume=True):
    """Stage 4: PART_DISTILL.DISTILL.ROUNDS rounds with cluster-slot labels from the ranked MODEL.WEIGHTS."""
    _check_part_model(cfg, "distill")
    k = check_slot_head(cfg, "distill")
    ranked_cfg = with_overrides(cfg, **{"MODEL.PART_DISTILL.NUM_PART_CLASSES": 1})

    def teacher_cfg(r):
        return ranked_cfg if r == 0 else cfg

    def labeler(teacher, r):
        if r > 0:
            return SlotHeadLabeler(k)
        if not bool(teacher.ranker.fitted_classes.any()):
            raise ValueError(f"the stage-4 teacher {cfg.MODEL.WEIGHTS} has no fitted ranker: run stage 'ranking' first")
        return RankerLabeler(teacher.ranker)

    info = run_rounds(cfg, stage="distill", num_rounds=cfg.PART_DISTILL.DISTILL.ROUNDS,
                      teacher_cfg_of_round=teacher_cfg, labeler_factory=labeler)
    return info.get("eval") or evaluate_stage(cfg, load_final_model(cfg, info["checkpoint"]))


def run_one_stage_baseline(cfg, resume=True):
    """The one-stage self-training baseline (part_distill/engine/one_stage.py)."""
    _check_part_model(cfg, "one_stage")
    info = run_one_stage(cfg, resume=resume)
    return info.get("eval") or evaluate_stage(cfg, load_final_model(cfg, info["checkpoint"]))


def run_supervised_stage(cfg, resume=True):
    """Few-shot fine-tuning of the part decoder on real part labels (part_distill/engine/supervised.py)."""
    return run_supervised(cfg, resume=resume)


def run_particle_stage(cfg, resume=True):
    """PARTICLE backbone adaptation (part_distill/particle/stage.py)."""
    return run_particle(cfg, resume=resume)


STAGE_RUNNERS = {
    "proposal": run_proposal,
    "self_train": run_self_train,
    "ranking": run_ranking_stage,
    "distill": run_distill,
    "one_stage": run_one_stage_baseline,
    "supervised": run_supervised_stage,
    "particle": run_particle_stage,
}


def run_stage(cfg, resume=True):
    """Run the stage ``cfg.PART_DISTILL.STAGE`` (one of STAGE_RUNNERS)."""
    stage = cfg.PART_DISTILL.STAGE
    if stage not in STAGE_RUNNERS:
        raise ValueError(f"no runner for PART_DISTILL.STAGE={stage!r}; stages with runners: {sorted(STAGE_RUNNERS)}")
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    res = STAGE_RUNNERS[stage](cfg, resume=resume)
    if comm.is_main_process() and res:
        # The pipeline driver and report read this file (as for the instance stage).
        atomic_write_json(os.path.join(cfg.OUTPUT_DIR, "eval_results.json"), res, indent=1, default=float)
    return res
