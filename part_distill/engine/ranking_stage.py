"""Stage "ranking" (Sec 4.3): candidates over the train images -> per-class prototypes -> the model's ranker.

The images are cut into chunks of SELF_TRAIN.SHARD_SIZE; rank r runs the model over chunks
c % world_size == r, keeps each object's candidate queries (``select_part_candidates``: score >
SCORE_THRESH, winning >= MIN_AREA_RATIO of the object) and writes their query features, object
classes, weights and ``(image index, object row, query id)`` keys as one class-bucketed chunk of
OUTPUT_DIR/ranking/candidates (``CandidateStore``). ``fit_store_prototypes`` then splits the
per-class weighted k-means across ranks by bucket. The prototypes go into ``model.ranker`` (a
PartRanker inside PartDistillationModel), and the model is saved with them as
OUTPUT_DIR/model_final.pth, next to ranking_report.json (candidates per class, cluster sizes, classes
without prototypes, said as a warning).

Resume: every file is written atomically; a rerun removes the temp files a kill left, keeps the
chunks and buckets already on disk (a damaged one is named and made again) and does the rest, so
a run killed at any point and rerun gives the files of an uninterrupted run. ``resume=False``
starts the stage's directory afresh.
"""
import logging
import math
import os
import shutil

import numpy as np
import torch
from detectron2.utils import comm

from ..data.fingerprint import CHECKPOINT_KEY, check_sources, checkpoint_fingerprints
from ..mining.store import config_hash
from ..modeling.checkpoint import PartDistillCheckpointer
from ..modeling.part_candidates import select_part_candidates
from ..utils.io import atomic_write_json, remove_stale_temps
from .candidate_store import CandidateStore, write_candidate_chunks
from .part_labels import (PartLabelFilters, build_label_mapper, dataset_inputs, file_sha256, predict_with_objects,
                          unwrap)
from .ranking import fit_store_prototypes

__all__ = ["WEIGHT_MODES", "candidate_weights", "collect_candidates", "install_prototypes", "run_ranking"]

logger = logging.getLogger(__name__)

WEIGHT_MODES = ("score_area", "score", "area", "uniform")


def candidate_weights(scores, area_ratios, mode="score_area"):
    """k-means sample weight of each candidate (PART_DISTILL.RANKING.WEIGHT)."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    area_ratios = torch.as_tensor(area_ratios, dtype=torch.float32)
    if mode == "score_area":
        return scores * area_ratios
    if mode == "score":
        return scores
    if mode == "area":
        return area_ratios
    if mode == "uniform":
        return torch.ones_like(scores)
    raise ValueError(f"PART_DISTILL.RANKING.WEIGHT must be one of {WEIGHT_MODES}, got {mode!r}")


@torch.no_grad()
def collect_candidates(model, items, mapper, filters, *, objects="gt", object_score_thresh=0.5,
                       weight_mode="score_area", batch_size=4, feature_dim=0):
    """Candidates of ``items`` [(image index, dataset dict)]: (features [n, D], classes [n], weights [n],
    keys [n, 3]) as numpy. ``feature_dim`` shapes the empty result of images without candidates."""
    mine = list(items)
    feats, classes, weights, keys = [], [], [], []
    dim = feature_dim
    was_training = model.training
    model.eval()
    for b in range(0, len(mine), batch_size):
        batch = mine[b:b + batch_size]
        for (index, _), (objs, pred) in zip(batch, predict_with_objects(
                model, [d for _, d in batch], mapper, objects, object_score_thresh)):
            dim = pred["features"].shape[1]
            for j, obj in enumerate(objs):
                mask = torch.as_tensor(obj.mask, device=pred["mask_probs"].device)
                q, _, ratio = select_part_candidates(pred["mask_probs"], pred["scores"], mask, filters.score_thresh,
                                                     filters.min_area_ratio, filters.max_area_ratio)
                if not len(q):
                    continue
                feats.append(pred["features"][q].cpu())
                classes.append(torch.full((len(q),), obj.category_id, dtype=torch.int64))
                weights.append(candidate_weights(pred["scores"][q].cpu(), ratio.cpu(), weight_mode))
                keys.append(torch.stack([torch.full_like(q, index), torch.full_like(q, j), q], 1).cpu())
    model.train(was_training)
    if not feats:
        return (np.zeros((0, dim), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32),
                np.zeros((0, 3), np.int64))
    return (torch.cat(feats).numpy(), torch.cat(classes).numpy(), torch.cat(weights).numpy(),
            torch.cat(keys).numpy())


def install_prototypes(ranker, prototypes):
    """Put ``{class: centers [k', D]}`` into a PartRanker (other classes are cleared)."""
    ranker.prototypes.zero_()
    ranker.prototype_valid.zero_()
    for c, centers in sorted(prototypes.items()):
        ranker.set_class_prototypes(c, centers)
    return ranker


def _run_info(cfg, summary, num_buckets):
    """What the candidates depend on: a rerun with other values refuses to mix them."""
    rk, s = cfg.PART_DISTILL.RANKING, cfg.PART_DISTILL.SELF_TRAIN
    weights = cfg.MODEL.WEIGHTS
    model_cfg = {k: v for k, v in cfg.MODEL.items() if k != "DEVICE"}
    config = {"weights": weights, "weights_sha": file_sha256(weights) if os.path.isfile(weights) else None,
              "model": model_cfg, "input": cfg.INPUT, "filters": PartLabelFilters.from_config(cfg).as_dict(),
              "objects": s.OBJECTS, "object_score_thresh": s.OBJECT_SCORE_THRESH, "weight": rk.WEIGHT,
              "shard_size": s.SHARD_SIZE, "num_buckets": num_buckets, "feature_dtype": rk.FEATURE_DTYPE}
    info = {"config": _plain(config), "inputs": summary}
    return dict(info, config_hash=config_hash(info))


def _plain(obj):
    """CfgNode / tuples -> JSON types (for hashing and run.json)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def run_ranking(cfg, model=None, resume=True):
    """Fit and install the ranker, save OUTPUT_DIR/model_final.pth; returns (model, report)."""
    from .trainer import PartDistillTrainer

    model_given = model
    if model is None:
        if not cfg.MODEL.WEIGHTS:
            raise ValueError("stage 'ranking' needs MODEL.WEIGHTS: the self-trained part model")
        model = PartDistillTrainer.build_model(cfg)
        loader = PartDistillCheckpointer(model)
        loader.load(cfg.MODEL.WEIGHTS)
        teacher_data = loader.last_metadata.get(CHECKPOINT_KEY, {}).get("sources")
    ranker = getattr(unwrap(model), "ranker", None)
    if ranker is None:
        raise TypeError(f"{type(unwrap(model)).__name__} has no PartRanker 'ranker'; stage 'ranking' needs "
                        "MODEL.META_ARCHITECTURE PartDistillationModel")
    rk, s = cfg.PART_DISTILL.RANKING, cfg.PART_DISTILL.SELF_TRAIN
    work = os.path.join(cfg.OUTPUT_DIR, "ranking")
    if comm.is_main_process():
        if not resume and os.path.isdir(work):
            shutil.rmtree(work)
        remove_stale_temps(cfg.OUTPUT_DIR)
    comm.synchronize()
    dicts, summary = dataset_inputs(s.DATASETS)
    if model_given is None:  # the model must have been trained on the data it is ranked on
        check_sources(teacher_data, {d["name"]: d["fingerprint"] for d in summary}, cfg.MODEL.WEIGHTS)
    num_classes = ranker.num_object_classes
    store = CandidateStore(os.path.join(work, "candidates"), min(rk.NUM_BUCKETS, max(num_classes, 1)),
                           rk.FEATURE_DTYPE)
    run_info = _run_info(cfg, summary, store.num_buckets)
    mapper, filters = build_label_mapper(cfg), PartLabelFilters.from_config(cfg)
    shard = max(int(s.SHARD_SIZE), 1)

    def produce(c):
        items = list(enumerate(dicts[c * shard:(c + 1) * shard], c * shard))
        return collect_candidates(model, items, mapper, filters, objects=s.OBJECTS,
                                  object_score_thresh=s.OBJECT_SCORE_THRESH, weight_mode=rk.WEIGHT,
                                  batch_size=s.BATCH_SIZE, feature_dim=ranker.feature_dim)

    num_chunks = int(math.ceil(len(dicts) / shard))
    write_candidate_chunks(store, run_info, num_chunks, produce, num_classes)
    prototypes, report = fit_store_prototypes(
        store, num_chunks, num_classes, ranker.clusters_per_class, work, seed=rk.SEED,
        min_candidates=rk.MIN_CANDIDATES, metric=rk.METRIC, max_iter=rk.MAX_ITER,
        max_samples=rk.MAX_SAMPLES_PER_CLASS)
    install_prototypes(ranker, prototypes)
    report.update(inputs=summary, weight=rk.WEIGHT, min_candidates=rk.MIN_CANDIDATES,
                  clusters_per_class={str(c): int(v.shape[0]) for c, v in sorted(prototypes.items())})
    report_path = os.path.join(cfg.OUTPUT_DIR, "ranking_report.json")
    if comm.is_main_process():
        atomic_write_json(report_path, report, indent=1, sort_keys=True)
    if not prototypes:
        # No model_final.pth: the pipeline must not take this stage for done.
        raise RuntimeError(f"Part ranking fitted no prototype for any of the {num_classes} object classes "
                           f"(candidates per class {report['candidates_per_class'][:20]}); see {report_path}. "
                           "Lower PART_DISTILL.RANKING.MIN_CANDIDATES or SELF_TRAIN.SCORE_THRESH / MIN_AREA_RATIO")
    if comm.is_main_process():
        # Written atomically (a kill never leaves half a file). The prototypes come from
        # SELF_TRAIN.DATASETS: stage 4 checks it labels the same data.
        saver = PartDistillCheckpointer(unwrap(model), save_dir=cfg.OUTPUT_DIR)
        saver.metadata = {CHECKPOINT_KEY: checkpoint_fingerprints(s.DATASETS)}
        saver.save("model_final")
        logger.info("Ranking: %d/%d object classes have prototypes; candidates per class %s",
                    len(prototypes), num_classes, report["candidates_per_class"][:50])
    comm.synchronize()
    return model, report
