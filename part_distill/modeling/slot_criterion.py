"""Stage-4 classification loss over cluster slots (Sec 4.3 "Final self training").

The head has NUM_OBJECT_CLASSES x k + 1 outputs; a target part of object class c with cluster j has
label c*k + j. A query matched to it is classified among class c's k slots plus no-object only.
Least change to the Mask2Former criterion: instead of gathering sliced logits, an additive
label-space mask (0 on the k slots of c and on no-object, -inf elsewhere) is added to the logits of
matched queries before the usual weighted cross-entropy, which equals the cross-entropy of the
sliced logits (softmax over k + 1). Unmatched queries keep the full logits and are pushed to
no-object, as in stages 2-3. The Hungarian matching cost is left unchanged (full softmax).
"""
import torch
from torch.nn import functional as F

from .criterion import SetCriterion

__all__ = ["slot_label_mask", "SlotSetCriterion"]


def slot_label_mask(labels, num_classes, clusters_per_class):
    """Additive mask [n, num_classes + 1] for targets ``labels`` [n] (slot ids c*k + j)."""
    k = clusters_per_class
    if num_classes % k:
        raise ValueError(f"{num_classes} part classes are not a multiple of CLUSTERS_PER_CLASS={k}")
    slots = torch.arange(num_classes + 1, device=labels.device)
    same_class = (slots[None, :num_classes] // k) == (labels[:, None] // k)
    keep = torch.cat([same_class, torch.ones_like(same_class[:, :1])], dim=1)
    mask = torch.zeros(keep.shape, dtype=torch.float32, device=labels.device)
    return mask.masked_fill(~keep, float("-inf"))


class SlotSetCriterion(SetCriterion):
    """SetCriterion whose matched queries are classified within their object class's slots."""

    def __init__(self, *args, clusters_per_class=8, **kwargs):
        super().__init__(*args, **kwargs)
        self.clusters_per_class = int(clusters_per_class)

    def loss_labels(self, outputs, targets, indices, num_masks):
        logits, (batch_idx, src_idx), matched, classes = self.class_targets(outputs, targets, indices)
        offset = torch.zeros_like(logits)
        offset[batch_idx, src_idx] = slot_label_mask(matched, self.num_classes, self.clusters_per_class)
        return {"loss_ce": F.cross_entropy((logits + offset).transpose(1, 2), classes, self.empty_weight)}
