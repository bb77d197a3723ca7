"""PARTICLE's part-contrastive objective (Sec 3.2, Eq. 1-3) and SelfPatch's neighbouring-patch loss.

* :func:`mask_pool` - Eq. 1: the label map is downsampled to the feature grid with nearest
  neighbour and features are averaged inside each part.
* :func:`part_contrastive_loss` - Eq. 3 with the latents of Eq. 2 rescaled to norm 1/sqrt(tau): the
  positive of part m is the same part in the other view; negatives are every other part of the
  same image and of the other images of the batch. Averaged over anchors (the paper writes a sum;
  the mean keeps the learning rate independent of how many parts a batch holds).
* SelfPatch (Yun et al. 2022): the positives of a patch are the ``k`` most similar of its 8
  neighbours under the teacher; an aggregation module (one class-attention block, no LayerScale,
  as in the supplementary's setting) summarises a patch with its positives; the student's
  aggregated patch i must predict the teacher's distribution of each positive j (DINO's
  cross-entropy with a centred, sharpened teacher).
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["mask_pool", "part_contrastive_loss", "MLPHead", "PrototypeHead", "neighbor_positives", "PatchAggregation",
           "selfpatch_loss", "SelfPatchCenter"]


def downsample_labels(labels, size):
    """Nearest-neighbour resize of int labels [B, H, W] to ``size`` (h, w) (Eq. 1's s)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def mask_pool(features, labels, num_parts):
    """Eq. 1. features [B, D, h, w], labels [B, H, W] (ids in [0, num_parts), -1 = none).

    Returns pooled [B, K, D] (zeros for parts absent from the grid) and counts [B, K] (cells).
    """
    lab = downsample_labels(labels, features.shape[-2:])
    onehot = (lab[..., None] == torch.arange(num_parts, device=lab.device)).to(features.dtype)  # [B, h, w, K]
    counts = onehot.sum((1, 2))
    sums = torch.einsum("bdhw,bhwk->bkd", features, onehot)
    return sums / counts.clamp_min(1.0)[..., None], counts


def part_contrastive_loss(pred, target, temperature):
    """Eq. 3 over N parts: pred [N, E] (p_m = q(g(y_m)), online view), target [N, E] (p'_m, momentum
    view); row m of both is the same part. Every other row of ``target`` is a negative of row m."""
    if pred.shape != target.shape or pred.dim() != 2:
        raise ValueError(f"pred and target must both be [N, E], got {tuple(pred.shape)} and {tuple(target.shape)}")
    scale = temperature ** -0.5
    p = F.normalize(pred, dim=1) * scale
    t = F.normalize(target, dim=1) * scale
    logits = p @ t.t()  # p_m . p'_n = cos / tau
    return F.cross_entropy(logits, torch.arange(len(p), device=p.device))


class MLPHead(nn.Sequential):
    """BYOL's projector / predictor: Linear -> BatchNorm -> ReLU -> Linear."""

    def __init__(self, in_dim, hidden_dim, out_dim):
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class PrototypeHead(nn.Module):
    """DINO's projection head: MLP to a bottleneck, L2-normalised, then cosine to ``out_dim`` unit
    prototypes (weight norm with the gain fixed to 1), so logits stay in [-1, 1] and the sharpened
    teacher cannot blow the cross-entropy up."""

    def __init__(self, in_dim, hidden_dim, out_dim, bottleneck_dim=64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        self.prototypes = nn.Parameter(torch.randn(out_dim, bottleneck_dim) * bottleneck_dim ** -0.5)

    def forward(self, x):
        return F.normalize(self.mlp(x), dim=-1) @ F.normalize(self.prototypes, dim=-1).t()


# 8-neighbourhood offsets (dy, dx), row-major.
_OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


@torch.no_grad()
def neighbor_positives(features, k):
    """Top-``k`` neighbours of each patch by cosine similarity of ``features`` [B, D, h, w].

    Returns flat patch indices [B, P, k] (P = h * w) and a validity mask [B, P, k] (False where a
    border patch has fewer than k neighbours). Ties keep the row-major neighbour order.
    """
    b, _, h, w = features.shape
    if not 1 <= k <= 8:
        raise ValueError(f"PARTICLE.SELFPATCH.NUM_NEIGHBORS must be in [1, 8], got {k}")
    f = F.normalize(features.float(), dim=1)
    ys = torch.arange(h, device=f.device)[:, None].expand(h, w)
    xs = torch.arange(w, device=f.device)[None, :].expand(h, w)
    sims, flat = [], []
    for dy, dx in _OFFSETS:
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        nyc, nxc = ny.clamp(0, h - 1), nx.clamp(0, w - 1)
        s = (f * f[:, :, nyc, nxc]).sum(1)  # [B, h, w]
        sims.append(s.masked_fill(~inside, -float("inf")))
        flat.append(nyc * w + nxc)
    sims = torch.stack(sims, -1).view(b, h * w, 8)
    flat = torch.stack(flat, -1).view(1, h * w, 8).expand(b, -1, -1)
    # Stable descending sort: equal similarities keep the neighbour order, so results are reproducible.
    order = torch.sort(sims, dim=-1, descending=True, stable=True).indices[..., :k]
    return flat.gather(-1, order), torch.isfinite(sims.gather(-1, order))


class PatchAggregation(nn.Module):
    """SelfPatch's aggregation module: patch i attends to itself and its positives (class attention)."""

    def __init__(self, dim, num_heads=4, mlp_ratio=2.0):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, tokens, index, valid):
        """tokens [B, P, D], index/valid [B, P, k] from :func:`neighbor_positives` -> [B, P, D]."""
        b, p, d = tokens.shape
        k = index.shape[-1]
        neigh = tokens.gather(1, index.reshape(b, p * k, 1).expand(-1, -1, d)).view(b, p, k, d)
        seq = torch.cat([tokens[:, :, None], neigh], 2).view(b * p, k + 1, d)
        pad = torch.cat([torch.zeros(b, p, 1, dtype=torch.bool, device=valid.device), ~valid], 2).view(b * p, k + 1)
        q = tokens.reshape(b * p, 1, d)
        out = q + self.attn(self.norm_q(q), self.norm_kv(seq), self.norm_kv(seq), key_padding_mask=pad,
                            need_weights=False)[0]
        out = out + self.mlp(self.norm_mlp(out))
        return out.view(b, p, d)


def selfpatch_loss(student_logits, teacher_logits, index, valid, student_temp=0.1, teacher_temp=0.04, center=None):
    """Mean over (patch i, positive j) of H(softmax((t_j - c) / T_t), softmax(s_i / T_s)).

    student_logits [B, P, O] (projections of the aggregated patches), teacher_logits [B, P, O]
    (projections of the teacher's patches), index/valid [B, P, k], center [O] or None.
    """
    b, p, o = teacher_logits.shape
    t = teacher_logits.detach()
    if center is not None:
        t = t - center
    t_prob = F.softmax(t / teacher_temp, dim=-1)
    k = index.shape[-1]
    t_pos = t_prob.gather(1, index.reshape(b, p * k, 1).expand(-1, -1, o)).view(b, p, k, o)
    s_logp = F.log_softmax(student_logits / student_temp, dim=-1)
    ce = -(t_pos * s_logp[:, :, None]).sum(-1)  # [B, P, k]
    w = valid.to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp_min(1.0)


class SelfPatchCenter(nn.Module):
    """DINO's running mean of the teacher logits, subtracted before sharpening (avoids collapse)."""

    def __init__(self, dim, momentum=0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(dim))

    @torch.no_grad()
    def update(self, teacher_logits):
        from detectron2.utils import comm

        mean = teacher_logits.detach().flatten(0, -2).mean(0)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(mean)
            mean /= comm.get_world_size()
        self.center.mul_(self.momentum).add_(mean, alpha=1.0 - self.momentum)
