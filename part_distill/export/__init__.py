"""part_distill.export: the part model as a traced graph (TorchScript, ONNX) with numerical checks."""
from .traceable import OUTPUT_NAMES, TraceablePartModel  # noqa: F401
from .exporter import export_model, export_main  # noqa: F401
