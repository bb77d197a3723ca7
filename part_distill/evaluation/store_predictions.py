"""Evaluate a part store (mined or self-training labels) as if it were a model's predictions.

This is the paper's "mined parts only" baseline: each stored part becomes a predicted part with
score 1 (ties keep the store's order), its k-means cluster id as ``pred_clusters`` and its
object's class as ``object_classes``. Cluster ids of mined parts are arbitrary per instance, which
is exactly why this baseline scores poorly on mIoU/NMI/ARI while its AR can be fair.
"""
import os

import numpy as np
import torch
from detectron2.structures import Instances

from ..data.fingerprint import check_store_dataset
from ..mining.store import PartStore, read_manifest
from ..utils.masks import decode_rle
from .build import build_part_evaluators

__all__ = ["iter_store_predictions", "evaluate_store"]


def iter_store_predictions(manifest_path):
    """Yield ``(input, output)`` pairs in the evaluators' format, one per stored image."""
    manifest = read_manifest(manifest_path)
    root = manifest_path if os.path.isdir(manifest_path) else os.path.dirname(os.path.abspath(manifest_path))
    store = PartStore(root)
    for entry in manifest["shards"]:
        shard = store.read_shard(os.path.basename(entry["file"]))
        by_image = {}
        for p in shard["annotations"]:
            by_image.setdefault(p["image_id"], []).append(p)
        for img in shard["images"]:
            h, w = img["height"], img["width"]
            parts = by_image.get(img["id"], [])
            inst = Instances((h, w))
            masks = np.stack([decode_rle(p["segmentation"]) for p in parts]) if parts \
                else np.zeros((0, h, w), dtype=bool)
            inst.pred_masks = torch.from_numpy(masks)
            inst.scores = torch.ones(len(parts))
            inst.pred_clusters = torch.tensor([p.get("cluster", -1) for p in parts], dtype=torch.long)
            inst.object_index = torch.full((len(parts),), -1, dtype=torch.long)
            inst.object_classes = torch.tensor([p["object_category_id"] for p in parts], dtype=torch.long)
            yield {"image_id": img["source_image_id"], "height": h, "width": w}, {"parts": inst}


def evaluate_store(cfg, manifest_path, dataset_name, output_dir):
    """Run the configured part evaluators of ``dataset_name`` over a store; returns the metric dict.

    Refuses (FingerprintMismatchError) a store made from another version of the dataset.
    """
    check_store_dataset(read_manifest(manifest_path), dataset_name, manifest_path)
    evaluator = build_part_evaluators(cfg, dataset_name, output_dir)
    evaluator.reset()
    for inp, out in iter_store_predictions(manifest_path):
        evaluator.process([inp], [out])
    return evaluator.evaluate()
