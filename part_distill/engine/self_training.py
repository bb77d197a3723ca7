"""Self-training rounds (Sec 3 / 4.2) and the final distillation rounds (Sec 4.3), resumable.

Round r of a stage lives in ``OUTPUT_DIR/round_{r}``:

    labels/            the teacher's filtered predictions, a PartStore (shards + manifest.json)
    model_*.pth        the student's checkpoints (detectron2 PeriodicCheckpointer, last_checkpoint)
    model_final.pth    the student after ITERS_PER_ROUND iterations
    model_ema.pth      its EMA weights (TEACHER "ema"), the next round's teacher
    round.json         written last: teacher, label counts, checkpoint, next teacher, config hash

A round with round.json is finished and skipped (a damaged round.json or labels manifest is named in
a warning and made again, never trusted). Otherwise the labels are (re)made shard by shard
(finished shards are kept) and the student resumes from the round's last checkpoint, or starts
from the teacher's weights. The teacher of round 0 is MODEL.WEIGHTS; the teacher of round r > 0 is
round r-1's final student ("snapshot") or its EMA ("ema"), as ``round.json`` names it.
"""
import logging
import os

import torch
from ..modeling.checkpoint import PartDistillCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..config import num_object_classes
from ..data.fingerprint import CHECKPOINT_KEY, check_sources, source_fingerprints
from ..data.pseudo_labels import PART_LABEL_KEY, PseudoLabelFilters, load_pseudo_labels, register_pseudo_labels
from ..mining.store import code_version, config_hash, read_manifest
from ..utils.io import DamagedFileError, atomic_open, atomic_write_json, read_json
from .part_labels import (PartLabelFilters, build_label_mapper, check_label_config, dataset_inputs, file_sha256,
                          label_run_info, unwrap, write_part_label_store)
from .trainer import PartDistillTrainer

__all__ = ["ModelEMA", "EMAHook", "run_rounds", "round_dir", "with_overrides", "PART_LABEL_KEY",
           "load_labelled_parts", "register_labelled_parts", "check_slot_head", "measure_fit"]

logger = logging.getLogger(__name__)

TEACHERS = ("snapshot", "ema")
ROUND_MANIFEST = "round.json"
# Annotation field of a label store that holds the stage-4 cluster-slot label (INPUT.PART_CLASS_KEY).
# Test hook: extra hooks (list of HookBase factories taking the round index) added to each student.
_extra_hooks = []


def with_overrides(cfg, **overrides):
    """A frozen copy of ``cfg`` with dotted ``KEY=value`` overrides (``"A.B": v``)."""
    out = cfg.clone()
    out.defrost()
    for key, value in overrides.items():
        node = out
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    out.freeze()
    return out


def check_slot_head(cfg, stage):
    """k of a stage that trains the cluster-slot head (NUM_OBJECT_CLASSES x k classes on PART_LABEL_KEY)."""
    pd = cfg.MODEL.PART_DISTILL
    k, num_objects = pd.CLUSTERS_PER_CLASS, num_object_classes(cfg)
    if pd.NUM_PART_CLASSES != num_objects * k:
        raise ValueError(f"stage {stage!r} needs MODEL.PART_DISTILL.NUM_PART_CLASSES = NUM_OBJECT_CLASSES x "
                         f"CLUSTERS_PER_CLASS = {num_objects * k}, got {pd.NUM_PART_CLASSES}")
    if cfg.INPUT.PART_CLASS_KEY != PART_LABEL_KEY:
        raise ValueError(f"stage {stage!r} trains on cluster slots: set INPUT.PART_CLASS_KEY {PART_LABEL_KEY!r}")
    return k


def measure_fit(cfg, model, dataset_name):
    """The fit of ``model`` to the training labels ``dataset_name`` (evaluation/fit.py) on the main
    process, or None (other ranks, PART_DISTILL.FIT.NUM_IMAGES 0)."""
    n = cfg.PART_DISTILL.FIT.NUM_IMAGES
    if n <= 0 or not comm.is_main_process():
        return None
    from ..data.store_dataset import build_store_train_set
    from ..evaluation.fit import fit_to_pseudo_labels

    # A store streams (the fit reads its first n images with parts); other datasets are lists.
    dicts = build_store_train_set([dataset_name]) or DatasetCatalog.get(dataset_name)
    return fit_to_pseudo_labels(unwrap(model), cfg, dicts, num_images=n)


def evaluate_labels(cfg, labels_dir, output_dir):
    """AR of a round's labels on PART_DISTILL.SELF_TRAIN.LABEL_EVAL_DATASET (main process; None if unset)."""
    name = cfg.PART_DISTILL.SELF_TRAIN.LABEL_EVAL_DATASET
    if not name or not comm.is_main_process():
        return None
    from ..evaluation.store_predictions import evaluate_store

    # Labels are class-agnostic until stage 4: only their recall is meaningful.
    eval_cfg = with_overrides(cfg, **{"TEST.PARTS.EVALUATORS": ["PartAREvaluator"]})
    return evaluate_store(eval_cfg, labels_dir, name, output_dir)


def round_dir(cfg, r):
    return os.path.join(cfg.OUTPUT_DIR, f"round_{r}")


# ---------------------------------------------------------------- EMA teacher
class ModelEMA:
    """Exponential moving average of a model's floating-point state (parameters and buffers)."""

    def __init__(self, model, decay):
        self.decay = float(decay)
        self.state = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}

    @torch.no_grad()
    def update(self, model):
        for k, v in unwrap(model).state_dict().items():
            if v.dtype.is_floating_point:
                self.state[k].mul_(self.decay).add_(v.detach(), alpha=1.0 - self.decay)
            else:
                self.state[k].copy_(v)

    def state_dict(self):
        return {"decay": self.decay, "state": self.state}

    def load_state_dict(self, state):
        self.decay = state["decay"]
        self.state = {k: v.clone() for k, v in state["state"].items()}


class EMAHook(HookBase):
    """Updates the EMA after every step; the trainer's checkpointer saves it, so resumes keep it."""

    def __init__(self, ema):
        self.ema = ema

    def after_step(self):
        self.ema.update(self.trainer.model)


# ---------------------------------------------------------------- labels as a training set
def load_labelled_parts(manifest_path, filters):
    """The pseudo-label dicts of a label store with each part's ``part_label`` (stage 4) kept."""
    return load_pseudo_labels(manifest_path, filters, part_labels=True)


def register_labelled_parts(name, manifest_path, filters):
    """Register a label store as a training set; the trainer streams it (data/store_dataset.py)."""
    return register_pseudo_labels(name, manifest_path, filters, part_labels=True)


# ---------------------------------------------------------------- rounds
def build_teacher(cfg, weights, data=None):
    """The teacher ``weights`` in eval mode; ``data`` ({dataset: fingerprint}, what it will label): refuse
    a teacher whose checkpoint records that it was trained on another version of those datasets."""
    model = PartDistillTrainer.build_model(cfg)
    loader = PartDistillCheckpointer(model)
    loader.load(weights)
    if data is not None:
        check_sources(loader.last_metadata.get(CHECKPOINT_KEY, {}).get("sources"), data, f"the teacher {weights}")
    model.eval()
    return model


def _label_round(cfg, teacher_cfg, teacher_weights, labels_dir, stage, r, labeler_factory):
    s = cfg.PART_DISTILL.SELF_TRAIN
    dicts, summary = dataset_inputs(s.DATASETS)
    filters = PartLabelFilters.from_config(cfg)
    config = {"stage": stage, "round": r, "teacher_sha256": file_sha256(teacher_weights),
              "filters": filters.as_dict(), "objects": s.OBJECTS, "object_score_thresh": s.OBJECT_SCORE_THRESH,
              "shard_size": s.SHARD_SIZE, "test_size": [teacher_cfg.INPUT.MIN_SIZE_TEST, teacher_cfg.INPUT.MAX_SIZE_TEST]}
    teacher = build_teacher(teacher_cfg, teacher_weights, {d["name"]: d["fingerprint"] for d in summary})
    labeler = labeler_factory(teacher, r) if labeler_factory is not None else None
    if labeler is not None:
        config["labeler"] = getattr(labeler, "description", type(labeler).__name__)
    run_info = label_run_info(config, summary)
    write_part_label_store(teacher, dicts, labels_dir, run_info, filters=filters, objects=s.OBJECTS,
                           object_score_thresh=s.OBJECT_SCORE_THRESH, mapper=build_label_mapper(teacher_cfg),
                           shard_size=s.SHARD_SIZE, batch_size=s.BATCH_SIZE, labeler=labeler)
    del teacher


def _train_student(cfg, rdir, dataset, init_weights, r):
    s = cfg.PART_DISTILL.SELF_TRAIN
    student_cfg = with_overrides(cfg, **{"OUTPUT_DIR": rdir, "DATASETS.TRAIN": (dataset,),
                                         "SOLVER.MAX_ITER": s.ITERS_PER_ROUND, "MODEL.WEIGHTS": init_weights})
    trainer = PartDistillTrainer(student_cfg)
    ema = None
    if s.TEACHER == "ema":
        ema = ModelEMA(trainer.model, s.EMA_DECAY)
        trainer.register_hooks_before_checkpoint([EMAHook(ema)])
        trainer.checkpointer.add_checkpointable("ema", ema)
    trainer.register_hooks([f(r) for f in _extra_hooks])
    # Resume within the round; a fresh round starts from the teacher's weights (resume_or_load
    # loads MODEL.WEIGHTS when the round has no checkpoint yet), and the EMA starts from them too.
    trainer.resume_or_load(resume=True)
    if ema is not None and trainer.checkpointer.resumed_from is None:
        ema.state = {k: v.detach().clone() for k, v in unwrap(trainer.model).state_dict().items()}
    if trainer.start_iter < trainer.max_iter:
        trainer.train()
    final = os.path.join(rdir, "model_final.pth")
    next_teacher = final
    if ema is not None:
        next_teacher = os.path.join(rdir, "model_ema.pth")
        if comm.is_main_process():
            with atomic_open(next_teacher, "wb") as f:
                torch.save({"model": ema.state}, f)
    comm.synchronize()
    fit = measure_fit(student_cfg, trainer.model, dataset)
    # Iterations done: after train() ``iter`` is max_iter; a skipped train leaves start_iter = max_iter.
    return (final, next_teacher, max(trainer.iter, trainer.start_iter), getattr(trainer, "_last_eval_results", None),
            fit)


def _read_if_intact(path, what):
    """The JSON of a job's last-written file, or None when it is missing or damaged (then it is re-made)."""
    try:
        return read_json(path, what)
    except FileNotFoundError:
        return None
    except DamagedFileError as e:
        logger.warning("%s: making it again", e)
        return None


def run_rounds(cfg, *, stage, num_rounds, teacher_cfg_of_round=None, labeler_factory=None):
    """Run (or resume) ``num_rounds`` rounds of ``stage``; returns the last round's manifest.

    ``teacher_cfg_of_round(r)`` gives the config the teacher is built with (default ``cfg``);
    ``labeler_factory(teacher, r)`` the stage-4 labeler (None: single-class "part" labels).
    """
    s = cfg.PART_DISTILL.SELF_TRAIN
    if s.TEACHER not in TEACHERS:
        raise ValueError(f"PART_DISTILL.SELF_TRAIN.TEACHER must be one of {TEACHERS}, got {s.TEACHER!r}")
    if num_rounds < 1:
        raise ValueError(f"{stage}: the number of rounds must be >= 1, got {num_rounds}")
    if not cfg.MODEL.WEIGHTS:
        raise ValueError(f"stage {stage!r} needs MODEL.WEIGHTS: the teacher of round 0")
    check_label_config(cfg)
    teacher = cfg.MODEL.WEIGHTS
    info = None
    for r in range(num_rounds):
        rdir = round_dir(cfg, r)
        done = os.path.join(rdir, ROUND_MANIFEST)
        finished = _read_if_intact(done, "round summary")
        if finished is not None:
            info = finished
            # A finished round stands for the data it was labelled from; other data must not reuse it.
            check_sources(info.get("data_fingerprints"), source_fingerprints(s.DATASETS), done)
            logger.info("%s round %d already finished (%s), skipped", stage, r, done)
            teacher = info["next_teacher"]
            continue
        teacher_cfg = teacher_cfg_of_round(r) if teacher_cfg_of_round else cfg
        labels_dir = os.path.join(rdir, "labels")
        if _read_if_intact(os.path.join(labels_dir, "manifest.json"), "labels manifest") is None:
            _label_round(cfg, teacher_cfg, teacher, labels_dir, stage, r, labeler_factory)
        comm.synchronize()
        labels_manifest = read_manifest(labels_dir)
        dataset = register_labelled_parts(
            f"{stage}_round{r}_labels_{config_hash([os.path.abspath(labels_dir), labels_manifest['config_hash']])}",
            labels_dir,
            PseudoLabelFilters.from_config(cfg))
        # The student starts from the teacher, except in stage 4 round 0 where the class head changes.
        final, next_teacher, iterations, results, fit = _train_student(cfg, rdir, dataset, teacher, r)
        results = dict(results or {})
        if fit is not None:
            results["fit"] = fit
        labels_eval = evaluate_labels(cfg, labels_dir, os.path.join(rdir, "labels_eval"))
        info = {"stage": stage, "round": r, "teacher": teacher, "teacher_kind": s.TEACHER if r else "init",
                "labels": {"manifest": os.path.join(labels_dir, "manifest.json"),
                           "config_hash": labels_manifest["config_hash"], "counts": labels_manifest["counts"],
                           "eval": labels_eval or {}},
                "checkpoint": final, "iterations": iterations, "eval": results, "next_teacher": next_teacher,
                "config_hash": config_hash(cfg.dump()), "code_version": code_version(),
                "data_fingerprints": {d["name"]: d["fingerprint"] for d in labels_manifest["inputs"]["datasets"]
                                      if d.get("fingerprint")}}
        if comm.is_main_process():
            atomic_write_json(done, info, indent=1, sort_keys=True)
        comm.synchronize()
        teacher = next_teacher
    return info
