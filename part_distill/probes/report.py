"""The probe table: one row per probed backbone, kept in ``probe_results.json`` and rendered as md/CSV.

Rows are keyed by label: probing again under a label replaces that row, a new label appends one,
so repeated runs (e.g. before/after PARTICLE, or another backbone config) build one table.
"""
import json
import math
import os

from ..evaluation.base import write_tables
from ..utils.io import atomic_write_json

__all__ = ["COLUMNS", "RESULTS_FILE", "TABLE_STEM", "load_rows", "merge_rows", "table_rows", "write_report"]

RESULTS_FILE = "probe_results.json"
TABLE_STEM = "probe_table"
FORMAT = "part_distill.probe_results"
# (column header, row key)
COLUMNS = (("AR@1", "AR@1"), ("AR@10", "AR@10"), ("linear mIoU", "linear_mIoU"), ("retrieval mAP", "retrieval_mAP"))


def load_rows(output_dir):
    """Rows of an earlier run in ``output_dir`` ([] when there is none)."""
    path = os.path.join(output_dir, RESULTS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        data = json.load(f)
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a probe results file (format {data.get('format')!r}, expected {FORMAT!r})")
    return data["rows"]


def merge_rows(old, new):
    """``old`` with rows of the same label replaced by ``new`` ones (in place of the old), others appended."""
    by_label = {r["label"]: r for r in new}
    out = [by_label.pop(r["label"], r) for r in old]
    return out + [r for r in new if r["label"] in by_label]


def _cell(v):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def table_rows(rows):
    return [[r["label"], *(_cell(r.get(key)) for _, key in COLUMNS)] for r in rows]


def _notes(rows):
    notes = ["AR@k: class-agnostic AR (%) of k-means parts (cfg.MINING.*) of the GT objects, IoU .50:.95 "
             "(PartDistillation Table 5). linear mIoU: mIoU (%) over part classes of a 1x1 conv on frozen "
             "features. retrieval mAP: mean AP (%) of cosine retrieval of same-category GT part crops "
             "(Zhu et al.). Rows:"]
    for r in rows:
        s = r.get("settings", {})
        notes.append(f"- {r['label']}: backbone {r.get('backbone')}, weights `{r.get('weights') or '(none)'}`, "
                     f"scored on {s.get('val_dataset')} ({s.get('val_images')} images), linear probe trained on "
                     f"{s.get('train_dataset')} ({s.get('train_images')} images); "
                     f"{r.get('wall_s', float('nan')):.0f} s.")
    return notes


def write_report(output_dir, rows):
    """Write probe_results.json, probe_table.md and probe_table.csv atomically; returns the markdown."""
    atomic_write_json(os.path.join(output_dir, RESULTS_FILE), {"format": FORMAT, "version": 1, "rows": rows},
                      indent=1)
    write_tables(output_dir, TABLE_STEM, ["backbone", *(h for h, _ in COLUMNS)], table_rows(rows), _notes(rows))
    with open(os.path.join(output_dir, TABLE_STEM + ".md")) as f:
        return f.read()
