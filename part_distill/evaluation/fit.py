"""How well a part model fits the pseudo-labels it was trained on ("under-fits" as a number).

For the first N images of a part store (the training labels, after the store filters), every
pseudo-label part is compared with every part query of the model on the un-augmented image: its
*best IoU* is the highest IoU of any query's mask (sigmoid > 0.5, at the image's resolution) with it.
A model that learned its labels reaches best IoUs near 1; the same network at initialisation stays
low (the learning test's control). All queries count, not only confident ones: the measure asks
whether the decoder can form the masks, ``AR@k`` on val asks whether it ranks them.
"""
import itertools
import logging

import numpy as np
import torch

from ..engine.part_labels import build_label_mapper, predict_part_queries
from ..modeling.meta_arch.postprocess import pairwise_mask_iou
from ..utils.masks import segmentation_to_mask

__all__ = ["best_ious", "fit_to_pseudo_labels", "fit_summary"]

logger = logging.getLogger(__name__)

# Best IoUs above this count as "fitted" (the usual proposal-match threshold).
FIT_IOU = 0.5


def best_ious(query_masks, target_masks):
    """Float[T]: for each target mask [T, H, W] the highest IoU of any query mask [Q, H, W] (0 if Q = 0)."""
    if len(target_masks) == 0:
        return torch.zeros(0)
    if len(query_masks) == 0:
        return torch.zeros(len(target_masks))
    return pairwise_mask_iou(target_masks, query_masks).max(1).values


def fit_summary(ious):
    """{"mean_best_iou", "frac_above_0.5", "num_targets"} of concatenated best IoUs (percent for the fraction)."""
    ious = np.asarray(ious, dtype=np.float64)
    if ious.size == 0:
        return {"mean_best_iou": float("nan"), f"frac_above_{FIT_IOU}": float("nan"), "num_targets": 0}
    return {"mean_best_iou": float(ious.mean()), f"frac_above_{FIT_IOU}": float(100.0 * (ious > FIT_IOU).mean()),
            "num_targets": int(ious.size)}


def _masks(annotations, d):
    size = (d["height"], d["width"])
    if not annotations:
        return torch.zeros((0, *size), dtype=torch.bool)
    return torch.from_numpy(np.stack([segmentation_to_mask(a["segmentation"], *size) for a in annotations])).bool()


@torch.no_grad()
def fit_to_pseudo_labels(model, cfg, dataset_dicts, num_images=16, batch_size=4):
    """Best-IoU fit of ``model`` (a PartDistillationModel) to the parts of ``dataset_dicts`` (store dicts).

    Images without a part are skipped (they have no target); the first ``num_images`` with parts count.
    Returns ``fit_summary`` plus ``num_images``.
    """
    mapper = build_label_mapper(cfg)
    was_training = model.training
    model.eval()
    # Stops at the first num_images: ``dataset_dicts`` may stream a whole store (StoreDataset).
    chosen = list(itertools.islice((d for d in dataset_dicts if d.get("annotations")), num_images))
    ious = []
    try:
        for i in range(0, len(chosen), batch_size):
            batch = chosen[i:i + batch_size]
            # Object-centric models crop the labels' owners, the objects they were trained on.
            owners = [_masks(d.get("objects", []), d) for d in batch]
            preds = predict_part_queries(model, [mapper(d) for d in batch], owner_masks=owners)
            for d, pred in zip(batch, preds):
                targets = _masks(d["annotations"], d)
                masks = pred["mask_probs"] > 0.5
                ious.append(best_ious(masks.cpu(), targets).numpy())
    finally:
        model.train(was_training)
    out = fit_summary(np.concatenate(ious) if ious else [])
    out["num_images"] = len(chosen)
    logger.info("Fit to %d pseudo-labels of %d images: mean best IoU %.3f, %.1f%% above %.1f", out["num_targets"],
                len(chosen), out["mean_best_iou"], out[f"frac_above_{FIT_IOU}"], FIT_IOU)
    return out
