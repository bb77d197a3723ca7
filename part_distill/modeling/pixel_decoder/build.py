"""Registry of pixel decoders: ``MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME`` picks one."""
from typing import Dict

from detectron2.layers import ShapeSpec
from detectron2.utils.registry import Registry

__all__ = ["PIXEL_DECODER_REGISTRY", "build_pixel_decoder", "common_pixel_decoder_args"]

PIXEL_DECODER_REGISTRY = Registry("PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = """
Pixel decoders turn backbone features into per-pixel mask features and multi-scale features.
Registered classes are built as ``cls(cfg, input_shape)`` and implement
``forward_features(features) -> (mask_features, transformer_encoder_features, multi_scale_features)``.
"""


def build_pixel_decoder(cfg, input_shape: Dict[str, ShapeSpec]):
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    model = PIXEL_DECODER_REGISTRY.get(name)(cfg, input_shape)
    if not callable(getattr(model, "forward_features", None)):
        raise ValueError(f"Pixel decoder {name} has no forward_features(features) method")
    return model


def common_pixel_decoder_args(cfg, input_shape: Dict[str, ShapeSpec]):
    """The ``from_config`` arguments every pixel decoder shares (inputs, widths, norm)."""
    h = cfg.MODEL.SEM_SEG_HEAD
    missing = [f for f in h.IN_FEATURES if f not in input_shape]
    if missing:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.IN_FEATURES {missing} not produced by the backbone ({sorted(input_shape)})")
    return {
        "input_shape": {k: v for k, v in input_shape.items() if k in h.IN_FEATURES},
        "conv_dim": h.CONVS_DIM,
        "mask_dim": h.MASK_DIM,
        "norm": h.NORM,
    }
