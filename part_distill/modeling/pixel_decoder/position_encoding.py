"""Sine position embedding of a feature map (DETR's normalised 2-D variant, no parameters)."""
import math

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """[B, C, H, W] -> [B, 2*num_pos_feats, H, W]: the y half first, then x, as in Mask2Former.

    Depends only on the map's size, so it is computed on the input's device from ``arange``
    (no host sync) and in the input's dtype.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats, self.temperature, self.normalize, self.scale = num_pos_feats, temperature, normalize, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        dev = x.device
        # 1-based cumulative positions, as a cumsum over an all-valid mask would give
        y = torch.arange(1, h + 1, device=dev, dtype=torch.float32)
        xs = torch.arange(1, w + 1, device=dev, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y = y / (h + eps) * self.scale
            xs = xs / (w + eps) * self.scale
        i = torch.arange(self.num_pos_feats, device=dev, dtype=torch.float32)
        dim_t = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.num_pos_feats)

        def encode(p):  # [L] -> [L, F], sin on even channels and cos on odd, interleaved
            a = p[:, None] / dim_t
            return torch.stack([a[:, 0::2].sin(), a[:, 1::2].cos()], dim=2).flatten(1)

        pos_y = encode(y)[:, None, :].expand(h, w, -1)
        pos_x = encode(xs)[None, :, :].expand(h, w, -1)
        pos = torch.cat([pos_y, pos_x], dim=2).permute(2, 0, 1)
        return pos[None].expand(b, -1, -1, -1).to(x.dtype)
