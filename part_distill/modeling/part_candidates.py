"""Which part queries count as parts of an object (PartDistillation Sec. 4.3, Sec. 4.2 filters).

Every pixel of an object is matched to its most confident query, ``argmax_i M_i(x) * s_i``. A query
is a *candidate* of that object when its score exceeds ``score_thresh`` (0.3) and the pixels it
wins cover at least ``min_area_ratio`` (5 %) of the object; optionally queries winning more than
``max_area_ratio`` of it (degenerate "whole object" parts, Sec. 5.4) are dropped too. The same
rule filters teacher predictions in self-training and gathers ranking features.
"""
import torch


def select_part_candidates(
    mask_probs, scores, object_mask, score_thresh=0.3, min_area_ratio=0.05, max_area_ratio=1.0
):
    """Candidates of one object.

    Args:
        mask_probs: [Q, H, W] per-query mask probabilities (sigmoid of the mask logits).
        scores: [Q] part scores s^p.
        object_mask: [H, W] bool object mask.

    Returns:
        (query_ids [n] long, won_masks [n, H, W] bool, area_ratios [n] float): the candidate
        queries in increasing id order, the object pixels each one wins, and their area fraction.
        Won masks of different candidates are disjoint and lie inside the object.
    """
    Q = mask_probs.shape[0]
    obj = object_mask.bool()
    obj_area = obj.sum()
    device = mask_probs.device
    if Q == 0 or not bool(obj_area > 0):
        H, W = obj.shape
        return (
            torch.zeros(0, dtype=torch.long, device=device),
            torch.zeros(0, H, W, dtype=torch.bool, device=device),
            torch.zeros(0, device=device),
        )
    # Only the object's own pixels are contested: the argmax runs over them, not the whole image.
    winner = (mask_probs[:, obj] * scores[:, None]).argmax(dim=0)  # [object pixels]
    won = torch.bincount(winner, minlength=Q)  # [Q] pixels won inside the object
    ratio = won.float() / obj_area.float()
    keep = (scores > score_thresh) & (ratio >= min_area_ratio) & (ratio <= max_area_ratio)
    query_ids = keep.nonzero().flatten()
    won_masks = torch.zeros((len(query_ids), *obj.shape), dtype=torch.bool, device=device)
    won_masks[:, obj] = winner[None] == query_ids[:, None]
    return query_ids, won_masks, ratio[query_ids]
