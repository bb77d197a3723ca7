#!/usr/bin/env python
"""Export the part model (encoder + decoders + ranker) to ONNX / TorchScript, verified on CPU.

  python tools/export.py --config-file configs/parts_world/distill.yaml --format both \
      --output output/export MODEL.DEVICE cpu

Writes part_model.onnx / part_model.ts and export_report.json (per-output max abs difference to
eager PyTorch, the tolerance, median CPU latency). Post-processing stays in Python
(part_distill/export/traceable.py says why).
"""
import logging
import sys

import part_distill  # noqa: F401  (registers models)
from part_distill.export import export_main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(0 if export_main()["ok"] else 1)
