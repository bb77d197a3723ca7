"""A trainable refinement of the frozen encoder's mask features, read only by the part decoder D^p.

Why: with the encoder frozen (paper Sec 4.1), D^p's masks are dot products of its queries with
per-pixel features that the instance teacher learned to separate *objects*. A small teacher (the
parts world's CPU one, 64-dim mask features) leaves parts inside an object nearly inseparable: the
part decoder then under-fits its own pseudo-labels. The adapter adds a residual conv branch on those
features (optionally fed with a fine backbone level) whose last conv starts at zero, so training
starts from exactly the teacher's features, and D^o keeps reading the unmodified ones.
"""
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, get_norm
from torch import nn
from torch.nn import functional as F

__all__ = ["PartMaskAdapter", "build_part_mask_adapter"]


class PartMaskAdapter(nn.Module):
    @configurable
    def __init__(self, *, mask_dim, hidden_dim, num_convs=2, skip_channels=0, skip_feature="", norm="GN"):
        """
        Args:
            mask_dim: channels of the mask features (in and out).
            hidden_dim: width of the conv branch.
            num_convs: 3x3 conv + norm + ReLU blocks before the zero-initialised 1x1 output conv.
            skip_channels, skip_feature: a backbone level (e.g. "res2", stride 4) concatenated to the
                input after a 1x1 projection; 0 / "" for none.
        """
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"MODEL.PART_DISTILL.MASK_ADAPTER.NUM_CONVS must be >= 1 when enabled, got {num_convs}")
        self.skip_feature = skip_feature
        self.skip_proj = None
        in_dim = mask_dim
        if skip_feature:
            self.skip_proj = Conv2d(skip_channels, hidden_dim, 1, norm=get_norm(norm, hidden_dim), activation=F.relu)
            in_dim += hidden_dim
        blocks = []
        for i in range(num_convs):
            blocks.append(Conv2d(in_dim if i == 0 else hidden_dim, hidden_dim, 3, padding=1, bias=not norm,
                                 norm=get_norm(norm, hidden_dim), activation=F.relu))
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv2d(hidden_dim, mask_dim, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @classmethod
    def from_config(cls, cfg, input_shape):
        a = cfg.MODEL.PART_DISTILL.MASK_ADAPTER
        skip = a.SKIP_FEATURE
        if skip and skip not in input_shape:
            raise ValueError(f"MODEL.PART_DISTILL.MASK_ADAPTER.SKIP_FEATURE {skip!r} is not a backbone output "
                             f"(outputs: {sorted(input_shape)})")
        return {"mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM, "hidden_dim": a.HIDDEN_DIM or cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
                "num_convs": a.NUM_CONVS, "skip_feature": skip,
                "skip_channels": input_shape[skip].channels if skip else 0, "norm": a.NORM}

    def forward(self, mask_features, backbone_features):
        x = mask_features
        if self.skip_proj is not None:
            s = self.skip_proj(backbone_features[self.skip_feature])
            if s.shape[-2:] != x.shape[-2:]:
                s = F.interpolate(s, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, s.to(x.dtype)], 1)
        return mask_features + self.out(self.blocks(x))


def build_part_mask_adapter(cfg, input_shape):
    """The adapter of MODEL.PART_DISTILL.MASK_ADAPTER, or None when NUM_CONVS is 0."""
    if cfg.MODEL.PART_DISTILL.MASK_ADAPTER.NUM_CONVS <= 0:
        return None
    return PartMaskAdapter(cfg, input_shape)
