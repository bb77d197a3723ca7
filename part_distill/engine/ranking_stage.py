"""Stage "ranking" (Sec 4.3): candidates over the train images -> per-class prototypes -> the model's ranker.

Every rank runs the model over its share of the images (image i goes to rank i % world_size),
keeps each object's candidate queries (``select_part_candidates``: score > SCORE_THRESH, winning
>= MIN_AREA_RATIO of the object), and hands their query features, object classes, weights and
``(image index, object row, query id)`` keys to ``fit_prototypes_distributed``, which splits the
per-class weighted k-means across ranks. The prototypes go into ``model.ranker`` (a PartRanker
inside PartDistillationModel), and the model is saved with them as OUTPUT_DIR/model_final.pth,
next to ranking_report.json (candidates per class, classes without prototypes).
"""
import logging
import os

import numpy as np
import torch
from ..modeling.checkpoint import PartDistillCheckpointer
from detectron2.utils import comm

from ..data.fingerprint import CHECKPOINT_KEY, check_sources, checkpoint_fingerprints
from ..modeling.part_candidates import select_part_candidates
from ..utils.io import atomic_write_json
from .part_labels import PartLabelFilters, build_label_mapper, dataset_inputs, predict_with_objects, unwrap
from .ranking import fit_prototypes_distributed

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
def collect_candidates(model, dataset_dicts, mapper, filters, *, objects="gt", object_score_thresh=0.5,
                       weight_mode="score_area", batch_size=4, feature_dim=0):
    """This rank's candidates: (features [n, D], classes [n], weights [n], keys [n, 3]) as numpy.

    ``feature_dim`` shapes the empty result of a rank that found no candidate."""
    rank, world = comm.get_rank(), comm.get_world_size()
    mine = [(i, d) for i, d in enumerate(dataset_dicts) if i % world == rank]
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


def run_ranking(cfg, model=None):
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
    dicts, summary = dataset_inputs(s.DATASETS)
    if model_given is None:  # the model must have been trained on the data it is ranked on
        check_sources(teacher_data, {d["name"]: d["fingerprint"] for d in summary}, cfg.MODEL.WEIGHTS)
    features, classes, weights, keys = collect_candidates(
        model, dicts, build_label_mapper(cfg), PartLabelFilters.from_config(cfg), objects=s.OBJECTS,
        object_score_thresh=s.OBJECT_SCORE_THRESH, weight_mode=rk.WEIGHT, batch_size=s.BATCH_SIZE,
        feature_dim=ranker.feature_dim)
    prototypes, report = fit_prototypes_distributed(
        features, classes, weights, keys, ranker.num_object_classes, ranker.clusters_per_class,
        os.path.join(cfg.OUTPUT_DIR, "ranking"), seed=rk.SEED, min_candidates=rk.MIN_CANDIDATES,
        metric=rk.METRIC, max_iter=rk.MAX_ITER)
    install_prototypes(ranker, prototypes)
    report.update(inputs=summary, weight=rk.WEIGHT, min_candidates=rk.MIN_CANDIDATES,
                  clusters_per_class={str(c): int(v.shape[0]) for c, v in sorted(prototypes.items())})
    if comm.is_main_process():
        saver = PartDistillCheckpointer(unwrap(model), save_dir=cfg.OUTPUT_DIR)
        # The prototypes come from SELF_TRAIN.DATASETS: stage 4 checks it labels the same data.
        saver.metadata = {CHECKPOINT_KEY: checkpoint_fingerprints(s.DATASETS)}
        saver.save("model_final")
        atomic_write_json(os.path.join(cfg.OUTPUT_DIR, "ranking_report.json"), report, indent=1, sort_keys=True)
        logger.info("Ranking: candidates per class %s; classes without prototypes %s",
                    report["candidates_per_class"], report["classes_without_prototypes"])
    comm.synchronize()
    return model, report
