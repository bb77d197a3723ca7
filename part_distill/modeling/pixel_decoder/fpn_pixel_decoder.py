"""FPN-only pixel decoder: no attention, for small CPU runs; same API as the deformable one.

Attribute names match MaskFormer/Mask2Former's ``BasePixelDecoder`` (``adapter_{i}`` lateral
1x1 convs for all but the coarsest level, ``layer_{i}`` 3x3 output convs, ``mask_features``).
"""
from typing import Dict

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from torch import nn
from torch.nn import functional as F

from .build import PIXEL_DECODER_REGISTRY, common_pixel_decoder_args
from .msdeform_pixel_decoder import NUM_MULTI_SCALE

__all__ = ["FPNPixelDecoder"]


@PIXEL_DECODER_REGISTRY.register()
class FPNPixelDecoder(nn.Module):
    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, conv_dim: int = 256, mask_dim: int = 256, norm: str = "GN"):
        """
        Args:
            input_shape: backbone features (at least 3 levels), e.g. res2..res5.
            conv_dim: FPN width; mask_dim: channels of the finest-level mask features.
            norm: norm of the convs ("" for none, with conv bias then).
        """
        super().__init__()
        shapes = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        if len(shapes) < NUM_MULTI_SCALE:
            raise ValueError(f"FPNPixelDecoder needs >= {NUM_MULTI_SCALE} input levels, got {[k for k, _ in shapes]}")
        self.in_features = [k for k, _ in shapes]
        use_bias = norm == ""
        lateral_convs, output_convs = [], []
        for idx, (_, v) in enumerate(shapes):
            coarsest = idx == len(shapes) - 1
            # The coarsest level has no top-down input: its 3x3 conv reads the backbone directly.
            lateral = None if coarsest else Conv2d(
                v.channels, conv_dim, kernel_size=1, bias=use_bias, norm=get_norm(norm, conv_dim))
            output = Conv2d(v.channels if coarsest else conv_dim, conv_dim, kernel_size=3, padding=1,
                            bias=use_bias, norm=get_norm(norm, conv_dim), activation=F.relu)
            if lateral is not None:
                weight_init.c2_xavier_fill(lateral)
                self.add_module(f"adapter_{idx + 1}", lateral)
            weight_init.c2_xavier_fill(output)
            self.add_module(f"layer_{idx + 1}", output)
            lateral_convs.append(lateral)
            output_convs.append(output)
        # coarse -> fine for the top-down pass; modules are registered above under checkpoint names
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]
        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=3, padding=1)
        weight_init.c2_xavier_fill(self.mask_features)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        return common_pixel_decoder_args(cfg, input_shape)

    def forward_features(self, features: Dict[str, torch.Tensor]):
        """Same outputs as ``MSDeformAttnPixelDecoder.forward_features``; the "encoder" feature
        is the coarsest FPN level."""
        outs = []
        y = None
        for name, lateral, output in zip(self.in_features[::-1], self.lateral_convs, self.output_convs):
            x = features[name]
            if lateral is None:
                y = output(x)
            else:
                cur = lateral(x)
                y = output(cur + F.interpolate(y, size=cur.shape[-2:], mode="nearest").to(cur.dtype))
            outs.append(y)
        return self.mask_features(y), outs[0], outs[:NUM_MULTI_SCALE]

    def forward(self, features):
        return self.forward_features(features)
