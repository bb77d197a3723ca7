"""Mask2Former-style pixel decoder: deformable encoder on the coarse levels, FPN up to stride 4.

Attribute names match Mask2Former's ``MSDeformAttnPixelDecoder`` (``input_proj.{i}.{0,1}``,
``transformer.*``, ``adapter_{i}``, ``layer_{i}``, ``mask_features``) so that the
``sem_seg_head.pixel_decoder.*`` keys of its checkpoints load into this module.
"""
import math
from typing import Dict, List

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from torch import nn
from torch.nn import functional as F

from .build import PIXEL_DECODER_REGISTRY, common_pixel_decoder_args
from .encoder import DeformableTransformerEncoderOnly
from .position_encoding import PositionEmbeddingSine

__all__ = ["MSDeformAttnPixelDecoder"]

# Mask2Former's transformer decoder always consumes three scales.
NUM_MULTI_SCALE = 3


def _sorted_by_stride(shapes: Dict[str, ShapeSpec]):
    return sorted(shapes.items(), key=lambda kv: kv[1].stride)


@PIXEL_DECODER_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        conv_dim: int = 256,
        mask_dim: int = 256,
        norm: str = "GN",
        transformer_in_features: List[str] = ("res3", "res4", "res5"),
        transformer_enc_layers: int = 6,
        transformer_nheads: int = 8,
        transformer_dim_feedforward: int = 1024,
        transformer_dropout: float = 0.0,
        transformer_n_points: int = 4,
        common_stride: int = 4,
    ):
        """
        Args:
            input_shape: backbone features to use (e.g. res2..res5) with channels and strides.
            conv_dim: width of the encoder and of the FPN convs.
            mask_dim: channels of the stride-``common_stride`` mask features.
            norm: norm of the FPN convs ("" for none, with conv bias then).
            transformer_in_features: the levels the deformable encoder attends over.
            common_stride: stride of the mask features; levels finer than the encoder's finest
                and no finer than this get FPN lateral/output convs.
        """
        super().__init__()
        missing = [f for f in transformer_in_features if f not in input_shape]
        if missing:
            raise ValueError(f"Encoder features {missing} are not among the pixel decoder inputs {sorted(input_shape)}")
        shapes = _sorted_by_stride(input_shape)
        self.in_features = [k for k, _ in shapes]
        enc_shapes = [(k, v) for k, v in shapes if k in transformer_in_features]
        # Encoder levels ordered coarse -> fine, as Mask2Former's input_proj indices are.
        self.transformer_in_features = [k for k, _ in enc_shapes][::-1]
        self.input_proj = nn.ModuleList()
        for _, v in enc_shapes[::-1]:
            proj = nn.Sequential(nn.Conv2d(v.channels, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
            self.input_proj.append(proj)
        self.transformer = DeformableTransformerEncoderOnly(
            d_model=conv_dim,
            nhead=transformer_nheads,
            num_encoder_layers=transformer_enc_layers,
            dim_feedforward=transformer_dim_feedforward,
            dropout=transformer_dropout,
            num_feature_levels=len(enc_shapes),
            enc_n_points=transformer_n_points,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1)
        weight_init.c2_xavier_fill(self.mask_features)
        self.common_stride = common_stride

        finest_enc_stride = min(v.stride for _, v in enc_shapes)
        self.num_fpn_levels = max(0, int(round(math.log2(finest_enc_stride) - math.log2(common_stride))))
        fpn_shapes = shapes[: self.num_fpn_levels]
        use_bias = norm == ""
        self.lateral_convs, self.output_convs = [], []
        for idx, (_, v) in enumerate(fpn_shapes):
            lateral = Conv2d(v.channels, conv_dim, kernel_size=1, bias=use_bias, norm=get_norm(norm, conv_dim))
            output = Conv2d(conv_dim, conv_dim, kernel_size=3, padding=1, bias=use_bias,
                            norm=get_norm(norm, conv_dim), activation=F.relu)
            weight_init.c2_xavier_fill(lateral)
            weight_init.c2_xavier_fill(output)
            # adapter_1/layer_1 belong to the finest level, as in Mask2Former's checkpoints.
            self.add_module(f"adapter_{idx + 1}", lateral)
            self.add_module(f"layer_{idx + 1}", output)
            self.lateral_convs.append(lateral)
            self.output_convs.append(output)
        # Top-down order (coarse -> fine) for the forward pass; plain lists, the modules are
        # already registered under their checkpoint names.
        self.lateral_convs = self.lateral_convs[::-1]
        self.output_convs = self.output_convs[::-1]
        self.fpn_features = [k for k, _ in fpn_shapes][::-1]
        if len(enc_shapes) + self.num_fpn_levels < NUM_MULTI_SCALE:
            raise ValueError(
                f"{len(enc_shapes)} encoder + {self.num_fpn_levels} FPN levels give fewer than "
                f"{NUM_MULTI_SCALE} multi-scale features; add inputs or lower COMMON_STRIDE."
            )

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        h = cfg.MODEL.SEM_SEG_HEAD
        return {
            **common_pixel_decoder_args(cfg, input_shape),
            "transformer_in_features": list(h.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES),
            "transformer_enc_layers": h.TRANSFORMER_ENC_LAYERS,
            "transformer_nheads": h.TRANSFORMER_ENC_NHEADS,
            "transformer_dim_feedforward": h.TRANSFORMER_ENC_DIM_FEEDFORWARD,
            "transformer_dropout": h.TRANSFORMER_ENC_DROPOUT,
            "transformer_n_points": h.TRANSFORMER_ENC_N_POINTS,
            "common_stride": h.COMMON_STRIDE,
        }

    def forward_features(self, features: Dict[str, torch.Tensor]):
        """
        Returns:
            mask_features: [B, mask_dim, H/common_stride, W/common_stride]
            transformer_encoder_features: the encoder's coarsest output level
            multi_scale_features: 3 maps [B, conv_dim, h, w], coarse (stride 32) -> fine (stride 8)
        """
        srcs, pos = [], []
        for proj, name in zip(self.input_proj, self.transformer_in_features):
            x = proj(features[name])
            srcs.append(x)
            pos.append(self.pe_layer(x))
        outs = self.transformer(srcs, pos)
        for name, lateral, output in zip(self.fpn_features, self.lateral_convs, self.output_convs):
            cur = lateral(features[name])
            up = F.interpolate(outs[-1], size=cur.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(output(cur + up.to(cur.dtype)))
        return self.mask_features(outs[-1]), outs[0], outs[:NUM_MULTI_SCALE]

    def forward(self, features):
        return self.forward_features(features)
