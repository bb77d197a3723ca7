"""Set criterion of the masked-attention decoders: classification + point-sampled mask losses."""
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from detectron2.utils import comm

from .matcher import HungarianMatcher


def sigmoid_bce_loss(pred_logits, target, num_masks):
    """Per-mask mean sigmoid-BCE over points, summed over masks and divided by ``num_masks``."""
    loss = F.binary_cross_entropy_with_logits(pred_logits, target, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(pred_logits, target, num_masks):
    """Dice loss (+1 smoothing) per mask over points, summed and divided by ``num_masks``."""
    prob = pred_logits.sigmoid()
    inter = 2 * (prob * target).sum(-1)
    total = prob.sum(-1) + target.sum(-1)
    return (1 - (inter + 1) / (total + 1)).sum() / num_masks


def uncertainty(logits):
    """PointRend uncertainty of mask logits [N, 1, P]: highest where the logit is closest to 0."""
    return -logits.abs()


def pad_target_masks(masks_list, dtype):
    """Stack per-image target masks [n_b, H_b, W_b] to [sum n, H, W], zero-padded bottom/right
    (the padded-batch frame that predicted masks live in)."""
    height = max(m.shape[-2] for m in masks_list)
    width = max(m.shape[-1] for m in masks_list)
    padded = [
        F.pad(m.to(dtype), (0, width - m.shape[-1], 0, height - m.shape[-2])) for m in masks_list
    ]
    return torch.cat(padded)


class SetCriterion(nn.Module):
    """Losses of a query-based mask decoder after Hungarian matching.

    ``forward`` returns unweighted losses ``loss_ce``, ``loss_mask``, ``loss_dice`` (plus
    ``_{i}``-suffixed copies for every aux output when deep supervision is on);
    ``weight_dict`` holds their weights and ``weighted(losses)`` applies them.
    """

    @configurable
    def __init__(self, num_classes, *, matcher, class_weight, mask_weight, dice_weight,
                 eos_coef, num_points, oversample_ratio, importance_sample_ratio,
                 deep_supervision=True, num_aux_outputs=0):
        """
        Args:
            num_classes: foreground classes; index ``num_classes`` is "no object".
            matcher: has ``match_many(list of outputs, targets)`` -> for each outputs, per-image
                (query_idx, target_idx) pairs (see ``HungarianMatcher``).
            eos_coef: weight of the no-object class in the classification loss.
            num_points / oversample_ratio / importance_sample_ratio: PointRend-style point
                sampling of the mask losses.
            num_aux_outputs: number of aux outputs of the decoder, for ``weight_dict``.
        """
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.eos_coef = eos_coef
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        # Same buffer name as Mask2Former's criterion, so its checkpoints load without leftovers.
        self.register_buffer("empty_weight", empty_weight)
        base = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.weight_dict = dict(base)
        if deep_supervision:
            for i in range(num_aux_outputs):
                self.weight_dict.update({f"{k}_{i}": v for k, v in base.items()})

    @classmethod
    def from_config(cls, cfg, num_classes=None):
        mf = cfg.MODEL.MASK_FORMER
        return {
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES if num_classes is None else num_classes,
            "matcher": HungarianMatcher(cfg),
            "class_weight": mf.CLASS_WEIGHT,
            "mask_weight": mf.MASK_WEIGHT,
            "dice_weight": mf.DICE_WEIGHT,
            "eos_coef": mf.NO_OBJECT_WEIGHT,
            "num_points": mf.TRAIN_NUM_POINTS,
            "oversample_ratio": mf.OVERSAMPLE_RATIO,
            "importance_sample_ratio": mf.IMPORTANCE_SAMPLE_RATIO,
            "deep_supervision": mf.DEEP_SUPERVISION,
            "num_aux_outputs": mf.DEC_LAYERS - 1,
        }

    def class_targets(self, outputs, targets, indices):
        """(logits [B,Q,C+1] fp32, (batch_idx, src_idx) of matched queries, their labels, and the
        per-query target classes [B,Q] with unmatched queries set to "no object")."""
        logits = outputs["pred_logits"].float()
        batch_idx, src_idx = self._src_permutation(indices, logits.device)
        matched = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[batch_idx, src_idx] = matched
        return logits, (batch_idx, src_idx), matched, classes

    def loss_labels(self, outputs, targets, indices, num_masks):
        """Cross-entropy over all queries; unmatched queries are trained towards "no object"."""
        logits, _, _, classes = self.class_targets(outputs, targets, indices)
        return {"loss_ce": F.cross_entropy(logits.transpose(1, 2), classes, self.empty_weight)}

    def sample_points(self, pred_masks):
        """Loss points for matched mask logits [N, 1, h, w] -> [N, P, 2] in [0, 1]: mostly
        where the prediction is uncertain, the rest uniform (PointRend importance sampling)."""
        return get_uncertain_point_coords_with_randomness(
            pred_masks, uncertainty, self.num_points, self.oversample_ratio, self.importance_sample_ratio
        )

    def loss_masks(self, outputs, targets, indices, num_masks):
        """BCE and dice between matched predicted and target masks on sampled points."""
        pred_masks = outputs["pred_masks"]
        batch_idx, src_idx = self._src_permutation(indices, pred_masks.device)
        if batch_idx.numel() == 0:
            # No target in the batch: zero losses that still reach every mask logit.
            zero = pred_masks.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero}
        src = pred_masks[batch_idx, src_idx][:, None].float()
        tgt = pad_target_masks([t["masks"][j] for t, (_, j) in zip(targets, indices)], torch.float32)
        tgt = tgt.to(src.device)[:, None]
        with torch.no_grad():
            coords = self.sample_points(src)
            point_labels = point_sample(tgt, coords, align_corners=False).squeeze(1)
        point_logits = point_sample(src, coords, align_corners=False).squeeze(1)
        return {
            "loss_mask": sigmoid_bce_loss(point_logits, point_labels, num_masks),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks),
        }

    def num_masks(self, targets, device):
        """Average number of target masks per rank (>= 1), kept on device (no host sync)."""
        count = torch.as_tensor(
            float(sum(len(t["labels"]) for t in targets)), dtype=torch.float32, device=device
        )
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(count)
        return torch.clamp(count / comm.get_world_size(), min=1.0)

    def forward(self, outputs, targets):
        """
        Args:
            outputs: decoder output dict (``pred_logits``, ``pred_masks``, optional ``aux_outputs``).
            targets: list of dicts ``{"labels": LongTensor[n], "masks": Bool/Float[n, H, W]}``,
                masks in the frame of the padded input batch.
        """
        for i, t in enumerate(targets):
            if t["masks"].shape[0] != t["labels"].shape[0]:
                raise ValueError(
                    f"target {i}: {t['masks'].shape[0]} masks but {t['labels'].shape[0]} labels"
                )
        device = outputs["pred_logits"].device
        num_masks = self.num_masks(targets, device)
        predictions = [outputs]
        if self.deep_supervision:
            predictions += list(outputs.get("aux_outputs", []))
        # All layers are matched together: one host sync per step instead of one per layer.
        all_indices = self.matcher.match_many(predictions, targets)
        losses = {}
        for i, (pred, indices) in enumerate(zip(predictions, all_indices)):
            suffix = "" if i == 0 else f"_{i - 1}"
            layer = self.loss_labels(pred, targets, indices, num_masks)
            layer.update(self.loss_masks(pred, targets, indices, num_masks))
            losses.update({k + suffix: v for k, v in layer.items()})
        return losses

    def weighted(self, losses):
        """Multiply each loss by its weight; losses without a weight are dropped."""
        return {k: v * self.weight_dict[k] for k, v in losses.items() if k in self.weight_dict}

    @staticmethod
    def _src_permutation(indices, device):
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx.to(device, non_blocking=True), src_idx.to(device, non_blocking=True)
