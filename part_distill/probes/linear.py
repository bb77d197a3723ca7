"""Linear part segmentation probe (Zhu et al., Sec 4 / Table 5): a 1x1 conv on frozen features.

Per-pixel cross-entropy over "background + every GT part class" on the train split; mIoU over the
part classes on the val split from one confusion matrix. The conv runs on the feature grid and its
logits are bilinearly interpolated at the label pixels: a 1x1 conv and bilinear interpolation are
both linear, so this equals the paper's "upsample the features, then 1x1 conv" at a fraction of
the cost. A pixel's centre maps to the grid exactly as in the miner's full-resolution assignment
(original pixel -> resized image -> grid cell, ``grid_sample`` with align_corners=False, border
padding). Training estimates the per-pixel loss from ``points_per_image`` labelled pixels drawn
uniformly (with replacement) per image and step; evaluation labels every pixel.
"""
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import point_sample
from torch import nn
from tqdm import tqdm

from .data import IGNORE

__all__ = ["LinearProbe", "pixel_grid_coords", "sample_logits", "train_linear_probe", "predict_labels",
           "confusion_matrix", "iou_from_confusion", "mean_iou"]

logger = logging.getLogger(__name__)


class LinearProbe(nn.Module):
    """``[B, D, h, w]`` features -> ``[B, C, h, w]`` logits."""

    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def forward(self, x):
        return self.conv(x)


def pixel_grid_coords(ys, xs, out_hw, resized_hw, stride, grid_hw):
    """``[P, 2]`` (x, y) in [0, 1] grid units of the centres of label pixels (ys, xs) of an ``out_hw`` image.

    The image was resized to ``resized_hw`` and its (padded) features lie on a ``grid_hw`` grid of ``stride``.
    """
    gy = (ys.double() + 0.5) * (resized_hw[0] / out_hw[0]) / stride / grid_hw[0]
    gx = (xs.double() + 0.5) * (resized_hw[1] / out_hw[1]) / stride / grid_hw[1]
    return torch.stack([gx, gy], 1).float()


def sample_logits(probe, grid, coords):
    """Logits ``[C, P]`` of the probe on ``grid`` [D, gh, gw], bilinearly interpolated at ``coords`` [P, 2]."""
    dev = probe.conv.weight.device
    logits = probe(grid[None].to(dev, torch.float32))
    return point_sample(logits, coords[None].to(dev), mode="bilinear", padding_mode="border",
                        align_corners=False)[0]


def train_linear_probe(grids, labels, sizes, stride, num_classes, *, iters=300, lr=0.01, weight_decay=0.0,
                       batch_size=16, points_per_image=4096, seed=0, device="cpu"):
    """Fit a :class:`LinearProbe` on ``grids[i]`` ([D, gh, gw]) against ``labels[i]`` ([H, W] int64).

    ``sizes[i]`` is the resized image size the grid was computed at. AdamW with a cosine decay from
    ``lr`` to 0; images are drawn in seeded epochs of random order, ``batch_size`` per step; the loss
    is the mean cross-entropy over the sampled labelled pixels of the batch (``points_per_image``
    per image, 0 = every labelled pixel). Same inputs and seed -> the same probe.
    """
    if not grids:
        raise ValueError("linear probe: no training images (all skipped or an empty dataset)")
    g = torch.Generator().manual_seed(int(seed))
    probe = LinearProbe(grids[0].shape[0], num_classes)
    with torch.no_grad():
        # Seeded init independent of the global RNG (nn.Conv2d draws from it).
        bound = 1.0 / math.sqrt(grids[0].shape[0])
        probe.conv.weight.copy_(torch.rand(probe.conv.weight.shape, generator=g) * 2 * bound - bound)
        probe.conv.bias.zero_()
    probe.to(device).train()
    # Labelled pixels of every image, as (ys, xs, labels), and their grid coordinates.
    pixels = []
    for grid, y, size in zip(grids, labels, sizes):
        ys, xs = torch.nonzero(y != IGNORE, as_tuple=True)
        coords = pixel_grid_coords(ys, xs, y.shape, size, stride, grid.shape[1:])
        pixels.append((coords, y[ys, xs].to(device)))
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 * (1 + math.cos(math.pi * it / max(iters, 1))))
    order = []
    loss = torch.zeros(())
    for _ in tqdm(range(iters), desc="linear probe", unit="it"):
        batch = []
        while len(batch) < min(batch_size, len(grids)):
            if not order:
                order = torch.randperm(len(grids), generator=g).tolist()
            batch.append(order.pop())
        loss_sum = torch.zeros((), device=device)
        n_pix = 0
        for i in batch:
            coords, y = pixels[i]
            if not len(y):
                continue
            if points_per_image:
                pick = torch.randint(len(y), (points_per_image,), generator=g).to(y.device)
                coords, y = coords[pick.cpu()], y[pick]
            logits = sample_logits(probe, grids[i], coords)
            loss_sum = loss_sum + F.cross_entropy(logits.t(), y, reduction="sum")
            n_pix += len(y)
        loss = loss_sum / max(n_pix, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    logger.info("linear probe: final training loss %.4f", loss.item())
    return probe.eval()


@torch.no_grad()
def predict_labels(probe, grid, size, stride, out_hw):
    """Arg-max label map ``[H, W]`` (int64, CPU) of one image of size ``out_hw``."""
    ys, xs = torch.meshgrid(torch.arange(out_hw[0]), torch.arange(out_hw[1]), indexing="ij")
    coords = pixel_grid_coords(ys.reshape(-1), xs.reshape(-1), out_hw, size, stride, grid.shape[1:])
    return sample_logits(probe, grid, coords).argmax(0).reshape(out_hw).cpu()


def confusion_matrix(pred, gt, num_classes, ignore_index=IGNORE):
    """``[C, C]`` int64 counts, rows = GT class, columns = predicted class; ``ignore_index`` GT pixels left out."""
    pred = torch.as_tensor(pred).reshape(-1).long()
    gt = torch.as_tensor(gt).reshape(-1).long()
    keep = gt != ignore_index
    pred, gt = pred[keep], gt[keep]
    if len(gt) and (int(gt.min()) < 0 or int(gt.max()) >= num_classes or int(pred.min()) < 0
                    or int(pred.max()) >= num_classes):
        raise ValueError(f"labels outside [0, {num_classes}) in the confusion matrix")
    return torch.bincount(gt * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes).numpy()


def iou_from_confusion(conf):
    """Per-class IoU = TP / (TP + FP + FN); NaN where the class is neither in the GT nor predicted."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(conf, classes=None):
    """Mean IoU in % over ``classes`` (default all) whose IoU is defined; NaN if none is."""
    iou = iou_from_confusion(conf)
    if classes is not None:
        iou = iou[list(classes)]
    iou = iou[~np.isnan(iou)]
    return float(iou.mean() * 100) if len(iou) else float("nan")
