from detectron2.utils.registry import Registry

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Registry for query-based mask decoders. A registered class is called as
``cls(cfg, in_channels, mask_classification, **overrides)`` and its ``forward(x, mask_features)``
takes the pixel decoder's multi-scale features (list, stride 32 -> 8) and mask features.
"""


def build_transformer_decoder(cfg, in_channels, mask_classification=True, **overrides):
    """Build ``cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME``; ``overrides`` replace config values
    (e.g. ``num_classes=1, num_queries=200`` for the part decoder)."""
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_classification, **overrides)
