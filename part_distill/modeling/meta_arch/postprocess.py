"""Inference post-processing shared by the meta-architectures (docs/formats.md output format).

Everything here is batched over queries (no Python loop over masks): decoder logits -> masks at
the output resolution -> scored, ranked ``Instances``; parts are assigned to objects by Eq. 1.
"""
import torch
from detectron2.structures import BitMasks, Instances
from torch.nn import functional as F

__all__ = [
    "masks_to_output",
    "mask_quality",
    "pairwise_mask_iou",
    "assign_parts_to_objects",
    "instance_inference",
    "part_inference",
    "owner_classes",
    "ranked_parts",
]


def masks_to_output(mask_logits, padded_size, image_size, output_size):
    """Mask logits [Q, h, w] of the padded batch -> logits [Q, H, W] at the output resolution.

    Upsampled to the padded input size, cropped to the image's own (augmented) size, then
    resized to ``output_size`` (the dataset's height, width), as detectron2's postprocess does.
    """
    x = F.interpolate(mask_logits[None].float(), size=tuple(padded_size), mode="bilinear",
                      align_corners=False)
    x = x[..., : image_size[0], : image_size[1]]
    if tuple(x.shape[-2:]) != tuple(output_size):
        x = F.interpolate(x, size=tuple(output_size), mode="bilinear", align_corners=False)
    return x[0]


def mask_quality(mask_logits, binary):
    """Mean foreground probability inside each binary mask [Q]; 0 for empty masks (Mask2Former)."""
    binary = binary.flatten(1).to(mask_logits.dtype)
    prob = mask_logits.flatten(1).sigmoid()
    return (prob * binary).sum(1) / (binary.sum(1) + 1e-6)


def pairwise_mask_iou(masks_a, masks_b):
    """IoU of every pair of boolean masks: [N, H, W] x [M, H, W] -> float [N, M] (0 where both empty)."""
    a = masks_a.flatten(1).float()
    b = masks_b.flatten(1).float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return inter / union.clamp(min=1.0)


def assign_parts_to_objects(part_masks, object_masks):
    """Eq. 1: each part's owner is the object of maximal IoU; -1 when it overlaps no object.

    Returns (object_index Long[N], iou Float[N]); ties go to the lowest object index.
    """
    n = part_masks.shape[0]
    if object_masks.shape[0] == 0 or n == 0:
        return (torch.full((n,), -1, dtype=torch.int64, device=part_masks.device),
                torch.zeros(n, device=part_masks.device))
    iou = pairwise_mask_iou(part_masks, object_masks)
    best, index = iou.max(dim=1)
    return torch.where(best > 0, index, torch.full_like(index, -1)), best


def owner_classes(owner, object_classes):
    """Class of each part's owner object (Long[N]), -1 for unowned parts; safe when there are no objects."""
    if object_classes.numel() == 0:
        return torch.full_like(owner, -1)
    return torch.where(owner >= 0, object_classes.to(owner.device)[owner.clamp(min=0)], torch.full_like(owner, -1))


def _boxes_of(masks):
    # COCOEvaluator reads pred_boxes; tight boxes of the masks keep that path meaningful.
    return BitMasks(masks).get_bounding_boxes()


def instance_inference(class_logits, mask_logits, *, top_k, score_thresh=0.0):
    """Mask2Former instance inference for one image.

    Args:
        class_logits: [Q, K + 1] (last = no object); mask_logits: [Q, H, W] at output resolution.
        top_k: number of (query, class) pairs kept, best first (a query may appear twice).
    Returns:
        Instances with pred_masks Bool[M, H, W], pred_classes, scores (class prob x mask quality),
        pred_boxes, sorted by score.
    """
    num_classes = class_logits.shape[1] - 1
    probs = class_logits.float().softmax(-1)[:, :-1]
    k = min(top_k, probs.numel())
    cls_scores, flat = probs.flatten().topk(k)
    query, classes = flat // num_classes, flat % num_classes
    logits = mask_logits[query]
    binary = logits > 0
    scores = cls_scores * mask_quality(logits, binary)
    order = scores.argsort(descending=True)
    keep = order[scores[order] >= score_thresh]
    result = Instances(tuple(mask_logits.shape[-2:]))
    result.pred_masks = binary[keep]
    result.pred_classes = classes[keep]
    result.scores = scores[keep]
    result.pred_boxes = _boxes_of(result.pred_masks)
    return result


def part_inference(class_logits, mask_logits, object_masks, object_classes, *, features=None,
                   clusters_per_class=8, score_thresh=0.0, top_k=0):
    """Part proposals of one image, assigned to objects by Eq. 1.

    Args:
        class_logits: [N, C + 1]; C = 1 (class-agnostic "part") or NUM_OBJECT_CLASSES x
            ``clusters_per_class`` cluster slots (stage 4).
        mask_logits: [N, H, W] at output resolution.
        object_masks: Bool[M, H, W] objects parts may belong to; object_classes: Long[M].
        features: optional [N, D] query features f^p, returned as pred_features.
    Returns:
        Instances (pred_masks, scores, pred_clusters, object_index, object_classes
        [, pred_features]) sorted by score. Class-agnostic heads give pred_clusters = -1; slot
        heads score each part over its owner's slots + no-object (over all slots if unowned).
    """
    binary = mask_logits > 0
    owner, _ = assign_parts_to_objects(binary, object_masks)
    owned = owner >= 0
    owner_class = owner_classes(owner, object_classes)
    num_classes = class_logits.shape[1] - 1
    logits = class_logits.float()
    if num_classes == 1:
        part_prob = logits.softmax(-1)[:, 0]
        clusters = torch.full_like(owner, -1)
    else:
        if num_classes % clusters_per_class:
            raise ValueError(f"{num_classes} part classes are not a multiple of "
                             f"CLUSTERS_PER_CLASS={clusters_per_class}")
        slots = owner_class.clamp(min=0)[:, None] * clusters_per_class + torch.arange(
            clusters_per_class, device=logits.device)
        sliced = torch.cat([logits.gather(1, slots), logits[:, -1:]], dim=1).softmax(-1)[:, :-1]
        sliced_prob, clusters = sliced.max(1)
        full_prob = logits.softmax(-1)[:, :-1].max(1).values
        # An owner of class -1 (a GT class outside the model's vocabulary, gt_class_map.py) has no slots.
        slotted = owned & (owner_class >= 0)
        part_prob = torch.where(slotted, sliced_prob, full_prob)
        clusters = torch.where(slotted, clusters, torch.full_like(clusters, -1))
    return ranked_parts(binary, part_prob * mask_quality(mask_logits, binary), clusters, owner, owner_class,
                        features=features, score_thresh=score_thresh, top_k=top_k)


def ranked_parts(binary, scores, clusters, owner, owner_class, *, features=None, score_thresh=0.0, top_k=0):
    """Instances of the parts scoring >= ``score_thresh``, best first, at most ``top_k`` (0 = all)."""
    order = scores.argsort(descending=True)
    order = order[scores[order] >= score_thresh]
    if top_k > 0:
        order = order[:top_k]
    result = Instances(tuple(binary.shape[-2:]))
    result.pred_masks = binary[order]
    result.scores = scores[order]
    result.pred_clusters = clusters[order]
    result.object_index = owner[order]
    result.object_classes = owner_class[order]
    if features is not None:
        result.pred_features = features[order].float()
    return result
