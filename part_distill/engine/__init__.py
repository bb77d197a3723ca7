"""part_distill.engine"""
from .trainer import PartDistillTrainer  # noqa: F401
