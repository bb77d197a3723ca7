"""part_distill.modeling"""
from . import backbone, pixel_decoder  # noqa
from . import transformer_decoder  # noqa
from . import meta_arch  # noqa
