"""Cluster-slot labelers of the stages that train the slot head (stage 4 and the one-stage baseline).

A labeler maps a teacher's predictions for the queries kept as parts of one object to slot ids
c*k + j (c = object class, j = cluster); -1 leaves a part unlabelled.
"""
import torch

__all__ = ["RankerLabeler", "SlotHeadLabeler"]


class RankerLabeler:
    """Stage-4 labels from a ranked teacher: slot c*k + argmax_k r_k (-1 where class c is unranked)."""

    def __init__(self, ranker):
        self.ranker = ranker
        self.k = ranker.clusters_per_class
        self.description = f"ranker k={self.k}"

    def __call__(self, pred, query_ids, object_class):
        feats = pred["features"][query_ids]
        classes = torch.full((len(query_ids),), int(object_class), dtype=torch.int64, device=feats.device)
        _, clusters, _ = self.ranker(feats, classes)
        return torch.where(clusters >= 0, object_class * self.k + clusters, torch.full_like(clusters, -1))


class SlotHeadLabeler:
    """Stage-4 labels of a slot-head teacher (rounds > 0): best of the owner class's k slots."""

    def __init__(self, clusters_per_class):
        self.k = int(clusters_per_class)
        self.description = f"slot head k={self.k}"

    def __call__(self, pred, query_ids, object_class):
        c = int(object_class)
        logits = pred["class_logits"][query_ids][:, c * self.k:(c + 1) * self.k]
        return c * self.k + logits.argmax(1)
