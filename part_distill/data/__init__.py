"""part_distill.data"""
from .datasets import parts_world as _parts_world  # noqa: F401
from .datasets import builtin_real as _builtin_real  # noqa: F401
