"""Run the three probes on one frozen backbone and return its table row (see report.py for the table).

The backbone is whatever ``cfg.MODEL.BACKBONE.NAME`` builds, with ``cfg.MODEL.WEIGHTS`` loaded the
way the miner loads it (``BackboneFeatures.from_config``: a full-model checkpoint's ``backbone.*``).
"""
import logging
import os
import re
import time

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from ..mining.features import BackboneFeatures, build_feature_extractor
from ..mining.miner import _plain
from .data import extract_dense_features, probe_subset, semantic_part_labels
from .grouping import run_grouping_probe
from .linear import confusion_matrix, iou_from_confusion, mean_iou, predict_labels, train_linear_probe
from .retrieval import embed_crops, part_crops, retrieval_average_precision

__all__ = ["PROBES", "default_label", "build_probe_extractors", "run_linear", "run_retrieval", "probe_backbone"]

logger = logging.getLogger(__name__)

PROBES = ("grouping", "linear", "retrieval")


def default_label(cfg):
    """``<parent dir>/<file>`` of MODEL.WEIGHTS, or the backbone name when there are none."""
    w = cfg.MODEL.WEIGHTS
    if w:
        return "/".join(os.path.normpath(w).split(os.sep)[-2:])
    return f"{cfg.MODEL.BACKBONE.NAME} (no MODEL.WEIGHTS)"


def _slug(label):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run"


def build_probe_extractors(cfg):
    """``(dense, pooled)`` extractors sharing one frozen backbone loaded from ``cfg``.

    ``dense``: PROBE.LINEAR.LEVELS on the finest level's grid (the miner's "hypercolumn");
    ``pooled``: PROBE.RETRIEVAL.LEVEL (default the deepest output), unnormalised.
    """
    c = cfg.clone()
    c.defrost()
    c.MINING.FEATURES = "hypercolumn"
    c.MINING.FEATURE_LEVELS = list(cfg.PROBE.LINEAR.LEVELS)
    c.MINING.NORMALIZE = cfg.PROBE.LINEAR.NORMALIZE
    try:
        dense = build_feature_extractor(c)
    except ValueError as e:
        raise ValueError(f"PROBE.LINEAR.LEVELS {list(cfg.PROBE.LINEAR.LEVELS)}: {e}") from e
    shapes = dense.backbone.output_shape()
    level = cfg.PROBE.RETRIEVAL.LEVEL or max(shapes, key=lambda k: shapes[k].stride)
    if level not in shapes:
        raise ValueError(f"PROBE.RETRIEVAL.LEVEL {level!r} is not an output of the backbone "
                         f"(it returns {sorted(shapes)}; see its OUT_FEATURES)")
    pooled = BackboneFeatures(backbone=dense.backbone, levels=[level], grid_level=level, normalize=False,
                              pixel_mean=tuple(cfg.MODEL.PIXEL_MEAN), pixel_std=tuple(cfg.MODEL.PIXEL_STD),
                              input_format=cfg.INPUT.FORMAT).to(cfg.MODEL.DEVICE).eval()
    return dense, pooled


def _label_list(label_maps, ids):
    return [torch.from_numpy(label_maps[i]) for i in ids]


def run_linear(cfg, extractor, train_name, val_name):
    """Train the linear probe on ``train_name``, score it on ``val_name``: mIoU (%) and per-class IoU."""
    lc = cfg.PROBE.LINEAR
    part_classes = list(MetadataCatalog.get(val_name).part_classes)
    num_classes = 1 + len(part_classes)
    train_maps = semantic_part_labels(train_name)
    ids, grids, sizes, train_skips = extract_dense_features(extractor, DatasetCatalog.get(train_name), lc.IMAGE_SIZE,
                                                             cfg.PROBE.BATCH_SIZE, desc="train features")
    probe = train_linear_probe(grids, _label_list(train_maps, ids), sizes, extractor.stride, num_classes,
                               iters=lc.ITERS, lr=lc.LR, weight_decay=lc.WEIGHT_DECAY, batch_size=lc.BATCH_SIZE,
                               points_per_image=lc.POINTS_PER_IMAGE, seed=lc.SEED, device=cfg.MODEL.DEVICE)
    n_train = len(ids)
    del grids
    val_maps = semantic_part_labels(val_name)
    ids, grids, sizes, val_skips = extract_dense_features(extractor, DatasetCatalog.get(val_name), lc.IMAGE_SIZE,
                                                           cfg.PROBE.BATCH_SIZE, desc="val features")
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for i, g, s in zip(ids, grids, sizes):
        gt = val_maps[i]
        conf += confusion_matrix(predict_labels(probe, g, s, extractor.stride, gt.shape), gt, num_classes)
    iou = iou_from_confusion(conf)
    return {"linear_mIoU": mean_iou(conf, range(1, num_classes)),
            "linear_background_IoU": float(iou[0] * 100),
            "linear_part_IoU": {p: (None if np.isnan(v) else float(v * 100)) for p, v in zip(part_classes, iou[1:])},
            "linear_train_images": n_train, "linear_val_images": len(ids),
            "linear_skipped": {"train": train_skips.as_dict(), "val": val_skips.as_dict()}}


def run_retrieval(cfg, extractor, val_name):
    """Part retrieval mAP (%) over the GT parts of ``val_name``."""
    rc = cfg.PROBE.RETRIEVAL
    mean = list(cfg.MODEL.PIXEL_MEAN)
    # Crops are RGB; a BGR model's PIXEL_MEAN is in BGR order.
    pad = mean[::-1] if cfg.INPUT.FORMAT == "BGR" else mean
    crops, cats, skips = part_crops(DatasetCatalog.get(val_name), rc.CROP_SIZE, pad)
    emb = embed_crops(extractor, crops, rc.RESIZE, cfg.PROBE.BATCH_SIZE)
    ap = retrieval_average_precision(emb, cats)
    valid = ~np.isnan(ap)
    return {"retrieval_mAP": float(ap[valid].mean() * 100) if valid.any() else float("nan"),
            "retrieval_queries": int(valid.sum()), "retrieval_queries_without_positive": int((~valid).sum()),
            "retrieval_skipped": skips.as_dict(), "retrieval_level": extractor.levels[0]}


def probe_backbone(cfg, label, output_dir):
    """Run ``cfg.PROBE.PROBES`` on the backbone of ``cfg``; returns its table row (a JSON-ready dict).

    The grouping probe's store and AR tables go to ``output_dir/<label slug>/``.
    """
    t0 = time.perf_counter()
    unknown = [p for p in cfg.PROBE.PROBES if p not in PROBES]
    if unknown or not cfg.PROBE.PROBES:
        raise ValueError(f"PROBE.PROBES must be a non-empty subset of {PROBES}, got {list(cfg.PROBE.PROBES)}")
    val = probe_subset(cfg.PROBE.DATASET, cfg.PROBE.NUM_VAL_IMAGES)
    train = probe_subset(cfg.PROBE.TRAIN_DATASET, cfg.PROBE.NUM_TRAIN_IMAGES)
    run_dir = os.path.join(output_dir, _slug(label))
    row = {"label": label, "backbone": cfg.MODEL.BACKBONE.NAME, "weights": cfg.MODEL.WEIGHTS,
           "settings": {"val_dataset": cfg.PROBE.DATASET, "val_images": len(DatasetCatalog.get(val)),
                        "train_dataset": cfg.PROBE.TRAIN_DATASET,
                        "train_images": len(DatasetCatalog.get(train)) if "linear" in cfg.PROBE.PROBES else 0,
                        "mining": {"features": cfg.MINING.FEATURES, "levels": list(cfg.MINING.FEATURE_LEVELS),
                                   "metric": cfg.MINING.METRIC, "k": cfg.MINING.NUM_CLUSTERS,
                                   "level": cfg.MINING.LEVEL, "image_size": cfg.MINING.IMAGE_SIZE,
                                   "crf": cfg.MINING.CRF.ENABLED},
                        "probe": _plain(cfg.PROBE)}}
    timings = {}
    if "grouping" in cfg.PROBE.PROBES:
        t = time.perf_counter()
        g = run_grouping_probe(cfg, val, os.path.join(run_dir, "grouping_store"),
                               os.path.join(run_dir, "grouping_eval"))
        row.update({"AR@1": g.pop("AR@1"), "AR@10": g.pop("AR@10"), "grouping": g})
        timings["grouping"] = time.perf_counter() - t
    if "linear" in cfg.PROBE.PROBES or "retrieval" in cfg.PROBE.PROBES:
        dense, pooled = build_probe_extractors(cfg)
        if "linear" in cfg.PROBE.PROBES:
            t = time.perf_counter()
            row.update(run_linear(cfg, dense, train, val))
            timings["linear"] = time.perf_counter() - t
        if "retrieval" in cfg.PROBE.PROBES:
            t = time.perf_counter()
            row.update(run_retrieval(cfg, pooled, val))
            timings["retrieval"] = time.perf_counter() - t
    row["timings_s"] = timings
    row["wall_s"] = time.perf_counter() - t0
    return row

