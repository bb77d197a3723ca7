"""part_distill: PartDistillation as a detectron2 extension.

Importing this package registers every dataset, backbone, meta-architecture and evaluator.
"""
from .config import add_part_distill_config  # noqa: F401
from . import data  # noqa: F401  (registers datasets)
from . import modeling  # noqa: F401  (registers backbones / heads / meta-architectures)
from . import evaluation  # noqa: F401
from . import mining  # noqa: F401
from . import engine  # noqa: F401

__version__ = "0.1.0"
