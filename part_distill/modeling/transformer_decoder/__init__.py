"""Masked-attention transformer decoders (Mask2Former-style), registered by name."""
from .build import TRANSFORMER_DECODER_REGISTRY, build_transformer_decoder
from .masked_attention_decoder import MaskedAttentionDecoder, MultiScaleMaskedTransformerDecoder

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "build_transformer_decoder",
    "MaskedAttentionDecoder",
    "MultiScaleMaskedTransformerDecoder",
]
