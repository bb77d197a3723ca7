"""Pixel decoder + masked-attention decoder under Mask2Former's module names.

The meta-architectures hold this as ``sem_seg_head`` with children ``pixel_decoder`` and
``predictor``, which is exactly where Mask2Former's checkpoints put those weights.
"""
from detectron2.config import configurable
from torch import nn

from ..pixel_decoder import build_pixel_decoder
from ..transformer_decoder import build_transformer_decoder

__all__ = ["MaskDecoderHead"]


class MaskDecoderHead(nn.Module):
    @configurable
    def __init__(self, *, pixel_decoder, predictor):
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {
            "pixel_decoder": build_pixel_decoder(cfg, input_shape),
            "predictor": build_transformer_decoder(cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM, True),
        }

    def encode(self, features):
        """Backbone features -> (mask_features, multi_scale_features) that every decoder reads."""
        mask_features, _, multi_scale = self.pixel_decoder.forward_features(features)
        return mask_features, multi_scale

    def forward(self, features):
        mask_features, multi_scale = self.encode(features)
        return self.predictor(multi_scale, mask_features)
