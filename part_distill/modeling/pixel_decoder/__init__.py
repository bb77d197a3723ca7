"""Pixel decoders; importing this package registers them in PIXEL_DECODER_REGISTRY."""
from .build import PIXEL_DECODER_REGISTRY, build_pixel_decoder  # noqa: F401
from .fpn_pixel_decoder import FPNPixelDecoder  # noqa: F401
from .ms_deform_attn import MSDeformAttn, ms_deform_attn_sample  # noqa: F401
from .msdeform_pixel_decoder import MSDeformAttnPixelDecoder  # noqa: F401
from .position_encoding import PositionEmbeddingSine  # noqa: F401
