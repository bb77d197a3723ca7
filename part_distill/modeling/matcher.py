"""Hungarian matching of predicted masks to targets on a shared random set of points."""
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.projects.point_rend.point_features import point_sample


def pairwise_sigmoid_bce(pred_logits, target):
    """Mean sigmoid-BCE of every prediction row against every target row.

    ``pred_logits`` [N, P], ``target`` [M, P] in [0, 1] -> [N, M]. Expanded as
    ``bce = t * bce(x, 1) + (1 - t) * bce(x, 0)`` so the N x M x P tensor is never built.
    """
    pos = F.binary_cross_entropy_with_logits(pred_logits, torch.ones_like(pred_logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(pred_logits, torch.zeros_like(pred_logits), reduction="none")
    cost = pos @ target.T + neg @ (1 - target).T
    return cost / pred_logits.shape[1]


def pairwise_dice(pred_logits, target):
    """Dice loss (+1 smoothing) of every sigmoid prediction against every target: [N, P], [M, P] -> [N, M]."""
    prob = pred_logits.sigmoid()
    inter = 2 * prob @ target.T
    total = prob.sum(-1)[:, None] + target.sum(-1)[None, :]
    return 1 - (inter + 1) / (total + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising
    ``cost_class * -p(target class) + cost_mask * BCE + cost_dice * dice``.

    Mask costs are computed on ``num_points`` random points shared by all predictions and
    targets of an image (coordinates normalised to the padded image, so predicted masks at
    1/4 resolution and targets at full resolution are compared at the same places).
    """

    @configurable
    def __init__(self, cost_class: float = 1.0, cost_mask: float = 1.0, cost_dice: float = 1.0,
                 num_points: int = 0):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all matching costs are 0")
        if num_points <= 0:
            raise ValueError(f"num_points must be positive, got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @classmethod
    def from_config(cls, cfg):
        mf = cfg.MODEL.MASK_FORMER
        return {
            "cost_class": mf.CLASS_WEIGHT,
            "cost_mask": mf.MASK_WEIGHT,
            "cost_dice": mf.DICE_WEIGHT,
            "num_points": mf.TRAIN_NUM_POINTS,
        }

    def cost_matrix(self, pred_logits, pred_masks, tgt_labels, tgt_masks, point_coords):
        """Matching cost of one image: [Q, C+1], [Q, h, w], [n], [n, H, W], [P, 2] -> [Q, n] fp32."""
        num_targets = tgt_labels.shape[0]
        if num_targets == 0:
            return pred_logits.new_zeros((pred_logits.shape[0], 0), dtype=torch.float32)
        prob = pred_logits.float().softmax(-1)
        cost_class = -prob[:, tgt_labels]
        coords = point_coords[None].to(torch.float32)
        pred_pts = point_sample(
            pred_masks[:, None].float(), coords.expand(pred_masks.shape[0], -1, -1), align_corners=False
        ).squeeze(1)
        tgt_pts = point_sample(
            tgt_masks[:, None].to(torch.float32), coords.expand(num_targets, -1, -1), align_corners=False
        ).squeeze(1)
        return (
            self.cost_class * cost_class
            + self.cost_mask * pairwise_sigmoid_bce(pred_pts, tgt_pts)
            + self.cost_dice * pairwise_dice(pred_pts, tgt_pts)
        )

    @torch.no_grad()
    def compute_costs(self, outputs, targets):
        """Per-image cost matrices ([Q, n_b] each) with freshly drawn random points."""
        costs = []
        for b, target in enumerate(targets):
            coords = torch.rand(self.num_points, 2, device=outputs["pred_masks"].device)
            costs.append(
                self.cost_matrix(
                    outputs["pred_logits"][b], outputs["pred_masks"][b],
                    target["labels"], target["masks"], coords,
                )
            )
        return costs

    @staticmethod
    def assign(costs):
        """Hungarian assignment of each cost matrix; one device->host copy for the whole batch."""
        flat = torch.cat([c.reshape(-1) for c in costs]).cpu() if costs else torch.zeros(0)
        indices, start = [], 0
        for c in costs:
            block = flat[start:start + c.numel()].view(c.shape).numpy()
            start += c.numel()
            rows, cols = linear_sum_assignment(block)
            indices.append((torch.as_tensor(rows, dtype=torch.int64),
                            torch.as_tensor(cols, dtype=torch.int64)))
        return indices

    @torch.no_grad()
    def forward(self, outputs, targets):
        """
        Args:
            outputs: dict with ``pred_logits`` [B, Q, C+1] and ``pred_masks`` [B, Q, h, w].
            targets: list of B dicts with ``labels`` LongTensor[n] and ``masks`` [n, H, W]
                (bool or float, in the frame of the padded input).

        Returns:
            list of B ``(query_idx, target_idx)`` int64 CPU tensors of length min(Q, n).
        """
        return self.assign(self.compute_costs(outputs, targets))

    @torch.no_grad()
    def match_many(self, outputs_list, targets):
        """``forward`` for several predictions of the same targets (deep supervision) with a
        single device->host copy for all of them; returns one index list per prediction."""
        costs = [self.compute_costs(outputs, targets) for outputs in outputs_list]
        flat = self.assign([c for per_output in costs for c in per_output])
        n = len(targets)
        return [flat[i * n:(i + 1) * n] for i in range(len(outputs_list))]
