"""Part retrieval AP (Zhu et al., Sec 4, Table 4) with GT part masks instead of keypoints.

Every GT part of the scored split gives one square crop of ``CROP_SIZE`` original pixels centred on
the part's centroid (padded with the model's pixel mean where it leaves the image, i.e. zeros at
the backbone input), resized to ``RESIZE`` and embedded by the frozen backbone: one level,
mean-pooled. Each part queries all the others by cosine similarity; its positives are the parts of
the same part category. AP per query is scikit-learn's ``average_precision_score`` (tied scores form
one threshold); mAP is the mean over queries that have at least one positive.
"""
import logging

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.image_io import SkipCounter, UnreadableImageError, read_image
from ..utils.masks import segmentation_to_mask

__all__ = ["part_crops", "embed_crops", "ranked_average_precision", "retrieval_average_precision"]

logger = logging.getLogger(__name__)


def _crop(image, cy, cx, size, pad_value):
    """``size`` x ``size`` window of ``image`` centred at (cy, cx); outside pixels are ``pad_value``."""
    h, w = image.shape[:2]
    y0, x0 = int(round(cy - size / 2)), int(round(cx - size / 2))
    out = np.empty((size, size, 3), dtype=np.uint8)
    out[:] = pad_value
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + size, h), min(x0 + size, w)
    if ye > ys and xe > xs:
        out[ys - y0: ye - y0, xs - x0: xe - x0] = image[ys:ye, xs:xe]
    return out


def part_crops(dataset_dicts, crop_size, pad_value=(127.5, 127.5, 127.5)):
    """``(crops [N, S, S, 3] uint8 RGB, part category ids [N], skips)`` of every GT part.

    Parts with an empty mask (nothing visible) and parts of unreadable images are skipped and
    counted, in parts, in ``skips`` (a ``SkipCounter``).
    """
    skips = SkipCounter("retrieval parts")
    pad = np.clip(np.round(np.asarray(pad_value, dtype=np.float64)), 0, 255).astype(np.uint8)
    crops, cats = [], []
    for d in tqdm(dataset_dicts, desc="part crops", unit="img"):
        parts = [p for a in d.get("annotations", []) if not a.get("iscrowd", 0) for p in a.get("parts", [])]
        if not parts:
            continue
        try:
            image = read_image(d["file_name"], format="RGB")
        except UnreadableImageError as e:
            skips.skip("unreadable_image", e, n=len(parts))
            continue
        for p in parts:
            m = segmentation_to_mask(p["segmentation"], d["height"], d["width"])
            ys, xs = np.nonzero(m)
            if not len(ys):
                skips.skip("empty_part_mask", f"part {p.get('id')} of {d['file_name']}")
                continue
            # Pixel centres: the centroid of pixel (y, x) is (y + 0.5, x + 0.5).
            crops.append(_crop(image, ys.mean() + 0.5, xs.mean() + 0.5, crop_size, pad))
            cats.append(int(p["category_id"]))
    skips.warn_summary()
    crops = np.stack(crops) if crops else np.zeros((0, crop_size, crop_size, 3), np.uint8)
    return crops, np.asarray(cats, dtype=np.int64), skips


def embed_crops(extractor, crops, resize, batch_size=32):
    """``[N, D]`` float32: the extractor's grid (one level) of each resized crop, mean-pooled over space."""
    div = max(int(extractor.size_divisibility), 1)
    side = int(np.ceil(resize / div) * div)
    device = extractor.pixel_mean.device
    out = []
    for b in tqdm(range(0, len(crops), batch_size), desc="embed crops", unit="batch"):
        batch = [cv2.resize(c, (side, side), interpolation=cv2.INTER_AREA if side < c.shape[0] else cv2.INTER_LINEAR)
                 for c in crops[b:b + batch_size]]
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(device, torch.float32)
        out.append(extractor(x).float().mean(dim=(2, 3)).cpu())
    return torch.cat(out) if out else torch.zeros((0, 0))


def ranked_average_precision(scores, relevant):
    """AP of each row of ``scores`` [Q, N] with relevance ``relevant`` [Q, N] bool; NaN for rows without positives.

    AP = sum over distinct score thresholds of (recall increase) x (precision at that threshold):
    scikit-learn's ``average_precision_score``, including its treatment of tied scores.
    """
    s_sorted, order = torch.as_tensor(scores, dtype=torch.float64).sort(dim=1, descending=True)
    r_sorted = torch.as_tensor(relevant).gather(1, order).double()
    tp_cum = r_sorted.cumsum(1)
    # Index one past the last item tied with each item: precision is read at the end of its tie group.
    neg = (-s_sorted).contiguous()
    ends = torch.searchsorted(neg, neg, right=True)
    precision = tp_cum.gather(1, ends - 1) / ends.double()
    npos = r_sorted.sum(1)
    ap = (r_sorted * precision).sum(1) / npos
    return torch.where(npos > 0, ap, torch.full_like(ap, float("nan")))


def retrieval_average_precision(embeddings, labels, query_chunk=512):
    """Per-query AP (NaN where the query has no positive) of cosine retrieval among ``embeddings``.

    Query i ranks every j != i by cosine similarity; j is relevant when ``labels[j] == labels[i]``.
    """
    x = F.normalize(torch.as_tensor(embeddings, dtype=torch.float64), dim=1, eps=1e-12)
    y = torch.as_tensor(labels).long()
    n = len(y)
    ap = torch.full((n,), float("nan"), dtype=torch.float64)
    for q0 in range(0, n, query_chunk):
        q = torch.arange(q0, min(q0 + query_chunk, n))
        sims = x[q] @ x.t()
        rel = y[q][:, None] == y[None, :]
        # The query itself is neither retrieved nor relevant: ranked after every cosine (>= -1), it changes no AP.
        sims[torch.arange(len(q)), q] = -3.0
        rel[torch.arange(len(q)), q] = False
        ap[q] = ranked_average_precision(sims, rel)
    return ap.numpy()
