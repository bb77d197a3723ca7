"""Part-awareness probes of frozen backbones (issue #8): pixel grouping AR, linear part segmentation, part retrieval.

``tools/probe_backbone.py`` runs them; ``docs/part_awareness_probes.md`` describes the protocol.
"""
from .grouping import grouping_cfg, run_grouping_probe
from .linear import (LinearProbe, confusion_matrix, iou_from_confusion, mean_iou, pixel_grid_coords,
                     predict_labels, sample_logits, train_linear_probe)
from .report import load_rows, merge_rows, write_report
from .retrieval import embed_crops, part_crops, retrieval_average_precision
from .runner import PROBES, build_probe_extractors, default_label, probe_backbone

__all__ = ["grouping_cfg", "run_grouping_probe", "LinearProbe", "confusion_matrix", "iou_from_confusion", "mean_iou",
           "pixel_grid_coords", "predict_labels", "sample_logits", "train_linear_probe", "load_rows", "merge_rows",
           "write_report", "embed_crops", "part_crops", "retrieval_average_precision", "PROBES",
           "build_probe_extractors", "default_label", "probe_backbone"]
