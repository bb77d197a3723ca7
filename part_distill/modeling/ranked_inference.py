"""Inference with the class-specific ranker (Sec 4.1 second stage, Eq. 2).

After Eq. 1 has given every part its owner object, the owner's class prototypes re-score it: the
final score is r = max_k r_k(f^p | class) alone (the paper's "relies fully on the reranked model")
and pred_clusters = argmax_k r_k. Parts without an owner, or whose owner's class has no
prototypes, get score 0 and cluster -1 (PartRanker's convention), so they rank last.
"""
import torch

__all__ = ["rerank_parts"]


@torch.no_grad()
def rerank_parts(parts, ranker):
    """Re-score ``parts`` (Instances from ``part_inference`` with pred_features) by ``ranker``; sorted by score."""
    if not parts.has("pred_features"):
        raise ValueError("re-ranking needs parts.pred_features: set MODEL.PART_DISTILL.TEST.RETURN_FEATURES True")
    _, clusters, scores = ranker(parts.pred_features.to(ranker.prototypes.device), parts.object_classes)
    parts.scores = scores.to(parts.scores.device)
    parts.pred_clusters = clusters.to(parts.pred_clusters.device)
    return parts[torch.argsort(parts.scores, descending=True, stable=True)]
