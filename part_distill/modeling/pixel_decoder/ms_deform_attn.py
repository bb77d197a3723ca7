"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021) in plain PyTorch.

No custom CUDA op: every sampling point is read with ``F.grid_sample`` (bilinear, zero padding,
``align_corners=False``), which is exactly the sampling rule of the reference CUDA kernel.
Parameter names (sampling_offsets, attention_weights, value_proj, output_proj) match
Mask2Former's ``MSDeformAttn`` so its checkpoints load.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MSDeformAttn", "ms_deform_attn_sample"]


def ms_deform_attn_sample(
    value: torch.Tensor,
    spatial_shapes: Sequence[Tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of bilinearly sampled values.

    Args:
        value: [N, S, M, D], S = sum(h*w) over levels (flattened row-major, level by level).
        spatial_shapes: (h, w) of each level, python ints (static shapes: no host sync).
        sampling_locations: [N, Lq, M, L, P, 2], (x, y) normalised to [0, 1] per level.
        attention_weights: [N, Lq, M, L, P], already normalised over L*P.
    Returns:
        [N, Lq, M*D]
    """
    n, _, m, d = value.shape
    _, lq, _, num_levels, p, _ = sampling_locations.shape
    sizes = [h * w for h, w in spatial_shapes]
    if sum(sizes) != value.shape[1]:
        raise ValueError(f"spatial_shapes {list(spatial_shapes)} cover {sum(sizes)} positions, value has {value.shape[1]}")
    grids = 2.0 * sampling_locations - 1.0  # grid_sample's [-1, 1] convention
    out = None
    for lvl, (v, (h, w)) in enumerate(zip(value.split(sizes, dim=1), spatial_shapes)):
        # heads go into the batch dimension: one grid_sample call per level
        v = v.permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(n * m, lq, p, 2)
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        a = attention_weights[:, :, :, lvl].transpose(1, 2).reshape(n * m, 1, lq, p)
        # Accumulating per level keeps memory at one level's samples, not all levels'.
        contrib = (sampled * a).sum(-1)  # [N*M, D, Lq]
        out = contrib if out is None else out + contrib
    return out.view(n, m * d, lq).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Each query attends to ``n_points`` learned offsets around its reference point, per head and level."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        # Offsets start at zero weight with a bias that spreads the heads over 8 directions and the
        # points at growing radii, so that training begins from a sensible local neighbourhood.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        dirs = torch.stack([angles.cos(), angles.sin()], -1)
        dirs = dirs / dirs.abs().max(-1, keepdim=True)[0]
        radii = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = dirs.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1) * radii
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes: List[Tuple[int, int]],
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: [N, Lq, C] (content + position).
            reference_points: [N or 1, Lq, L, 2], (x, y) in [0, 1] of each query on each level.
            input_flatten: [N, S, C] values of all levels, flattened level by level.
            spatial_shapes: (h, w) per level, python ints.
            padding_mask: optional [N, S] bool, True at padded positions (their values are zeroed).
        Returns:
            [N, Lq, C]
        """
        n, lq, _ = query.shape
        if len(spatial_shapes) != self.n_levels:
            raise ValueError(f"MSDeformAttn built for {self.n_levels} levels, got {len(spatial_shapes)}")
        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(n, -1, self.n_heads, self.d_model // self.n_heads)
        shape = (n, lq, self.n_heads, self.n_levels, self.n_points)
        offsets = self.sampling_offsets(query).view(*shape, 2)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, -1).softmax(-1).view(shape)
        # Locations in fp32 even under autocast: bf16 would put them ~0.3 px off on an 80 px map.
        with torch.autocast(device_type=query.device.type, enabled=False):
            offsets = offsets.float()
            # Offsets are in pixels of each level: normalise by that level's (w, h). Python
            # scalars, not a tensor built from a list, so nothing is copied to the device.
            scaled = torch.stack(
                [torch.stack([offsets[:, :, :, l, :, 0] / w, offsets[:, :, :, l, :, 1] / h], -1)
                 for l, (h, w) in enumerate(spatial_shapes)], dim=3)
            locations = reference_points.float()[:, :, None, :, None, :] + scaled
            out = ms_deform_attn_sample(value.float(), spatial_shapes, locations, weights.float())
        return self.output_proj(out.to(query.dtype))
