"""Deformable-attention transformer encoder over a stack of feature levels.

Module and parameter names follow Mask2Former's ``MSDeformAttnTransformerEncoderOnly``
(``level_embed``, ``encoder.layers.{i}.self_attn / norm1 / linear1 / linear2 / norm2``).
"""
import copy
from typing import List, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .ms_deform_attn import MSDeformAttn

__all__ = ["DeformableEncoderLayer", "DeformableEncoder", "DeformableTransformerEncoderOnly", "reference_points"]


def reference_points(spatial_shapes: List[Tuple[int, int]], device) -> torch.Tensor:
    """Pixel centres of every level, normalised to [0, 1]: [1, S, 2] as (x, y)."""
    refs = []
    for h, w in spatial_shapes:
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        refs.append(torch.stack([gx.reshape(-1), gy.reshape(-1)], -1))
    return torch.cat(refs, 0)[None]


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention, then a ReLU FFN."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.0, n_levels=3, n_heads=8, n_points=4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, refs, spatial_shapes):
        attn = self.self_attn(src + pos, refs, src, spatial_shapes)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableEncoder(nn.Module):
    def __init__(self, layer: DeformableEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])

    def forward(self, src, pos, spatial_shapes):
        # Without padding masks every level covers the whole image, so a query's reference
        # point is the same normalised position on every level.
        refs = reference_points(spatial_shapes, src.device)[:, :, None, :].expand(-1, -1, len(spatial_shapes), -1)
        for layer in self.layers:
            src = layer(src, pos, refs, spatial_shapes)
        return src


class DeformableTransformerEncoderOnly(nn.Module):
    """Flattens the levels, adds level embeddings to the positions, runs the encoder, splits back."""

    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, dim_feedforward=1024, dropout=0.0,
                 num_feature_levels=3, enc_n_points=4):
        super().__init__()
        layer = DeformableEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points)
        self.encoder = DeformableEncoder(layer, num_encoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.reset_parameters()

    def reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: List[torch.Tensor], pos_embeds: List[torch.Tensor]) -> List[torch.Tensor]:
        """srcs / pos_embeds: per level [B, C, h, w] -> encoded maps of the same shapes."""
        shapes = [(int(s.shape[2]), int(s.shape[3])) for s in srcs]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[l].view(1, 1, -1).to(p.dtype)
             for l, p in enumerate(pos_embeds)], 1)
        memory = self.encoder(src, pos, shapes)
        b, _, c = memory.shape
        return [m.transpose(1, 2).reshape(b, c, h, w) for m, (h, w) in zip(memory.split([h * w for h, w in shapes], 1), shapes)]
