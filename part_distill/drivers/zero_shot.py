"""The zero-shot tables: one checkpoint evaluated on real part datasets it never trained on.

* Table 3 layout (``<out>/zero_shot.md`` / ``.csv``): one row per dataset; AR@200 and mIoU with the
  model's own objects (D^o's predictions scoring >= the object score, AR over every proposal) and
  with the GT objects (parts owned by GT objects, AR clipped to their union), as the demo's rows.
* Table 2 (``<out>/zero_shot_nmi_ari.md`` / ``.csv``): per-class NMI / ARI with GT objects on one
  dataset (Pascal-Part by default).

Each cell is one ``tools/train_net.py --eval-only`` run with ``DATASETS.TEST`` = the dataset and
``MODEL.PART_DISTILL.OBJECTS`` = predicted | gt, in ``<out>/<dataset>/<pred|gt>``; it is finished when
its ``eval_results.json`` exists, so a rerun only fills the missing cells (``pipeline.run_steps``).
A real dataset whose files are absent is a counted skip: its row says ``not found: <path>`` and no
run starts for it (a custom dataset is always run; its loader raises if its files are missing).
"""
import json
import math
import os

from ..data.datasets.builtin_real import required_paths
from ..evaluation.base import write_tables
from .demo import PRED_OBJECT_SCORE
from .pipeline import Step

__all__ = ["DEFAULT_CONFIG", "DEFAULT_DATASETS", "NMI_ARI_DATASET", "PRED_OBJECT_SCORE", "OBJECT_MODES", "cell_dir",
           "missing_path", "build_zero_shot_steps", "collect_zero_shot", "zero_shot_rows", "nmi_ari_rows",
           "write_zero_shot_tables"]

DEFAULT_CONFIG = "configs/zero_shot/distill.yaml"
DEFAULT_DATASETS = ("pascal_part_val_parts", "part_imagenet_val_parts", "cityscapes_parts_val_parts")
NMI_ARI_DATASET = "pascal_part_val_parts"
# objects mode -> (MODEL.PART_DISTILL.OBJECTS, evaluators, AR key of parts_ar). With predicted objects
# AR counts every proposal; with GT objects it clips them to the objects' union (demo.COLUMNS).
OBJECT_MODES = {
    "pred": ("predicted", ["PartAREvaluator", "PartMIoUEvaluator"], "AR@200"),
    "gt": ("gt", ["PartAREvaluator", "PartMIoUEvaluator", "PartNMIARIEvaluator"], "AR@200-gtobj_union"),
}
# Table 3's "GT obj." column per mode; metrics of a cell: AR@200 and mIoU.
GT_OBJECT_MARK = {"pred": "", "gt": "yes"}
HEADER = ["test dataset", "GT obj.", "AR@200", "mIoU", "status"]


def cell_dir(out, dataset, mode):
    return os.path.join(out, dataset, mode)


def missing_path(dataset):
    """The first file or folder real dataset ``dataset`` needs that is absent (None: all there, or not a
    real dataset)."""
    return next((p for p in required_paths(dataset) if not os.path.exists(p)), None)


def build_zero_shot_steps(out, weights, datasets=DEFAULT_DATASETS, config=DEFAULT_CONFIG, opts=(), launch=(),
                          object_score=PRED_OBJECT_SCORE):
    """(steps, skipped): one Step per (available dataset, objects mode); ``skipped`` maps each dataset
    whose files are absent to the missing path."""
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"zero-shot: checkpoint {weights!r} does not exist")
    steps, skipped = [], {}
    for name in datasets:
        path = missing_path(name)
        if path is not None:
            skipped[name] = path
            continue
        for mode, (objects, evaluators, _) in OBJECT_MODES.items():
            d = cell_dir(out, name, mode)
            steps.append(Step(
                f"{name}_{mode}",
                ["tools/train_net.py", "--config-file", config, "--eval-only", *launch, *opts,
                 "MODEL.WEIGHTS", weights, "DATASETS.TEST", f"('{name}',)", "MODEL.PART_DISTILL.OBJECTS", objects,
                 "MODEL.PART_DISTILL.TEST.OBJECT_SCORE_THRESH", repr(float(object_score)),
                 "TEST.PARTS.EVALUATORS", json.dumps(evaluators), "OUTPUT_DIR", d],
                os.path.join(d, "eval_results.json"),
                f"evaluate on {name} with {objects} objects"))
    return steps, skipped


def collect_zero_shot(out, datasets):
    """{dataset: {mode: eval_results.json}} of the finished cells."""
    results = {}
    for name in datasets:
        for mode in OBJECT_MODES:
            path = os.path.join(cell_dir(out, name, mode), "eval_results.json")
            if os.path.isfile(path):
                with open(path) as f:
                    results.setdefault(name, {})[mode] = json.load(f)
    return results


def _metric(res, mode, metric):
    if res is None:
        return None
    if metric == "AR":
        return res.get("parts_ar", {}).get(OBJECT_MODES[mode][2])
    return res.get("parts_miou", {}).get("mIoU")


def _cell(x):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def zero_shot_rows(results, skipped, datasets):
    """Table 3 rows, two per dataset (own objects, GT objects): [dataset, GT obj., AR@200, mIoU, status]
    with floats or "n/a"; status "ok", "not run" or "not found: <path>"."""
    rows = []
    for name in datasets:
        for mode in OBJECT_MODES:
            res = results.get(name, {}).get(mode)
            status = f"not found: {skipped[name]}" if name in skipped else ("ok" if res is not None else "not run")
            rows.append([name, GT_OBJECT_MARK[mode], _cell(_metric(res, mode, "AR")), _cell(_metric(res, mode, "mIoU")),
                         status])
    return rows


def nmi_ari_rows(results, dataset=NMI_ARI_DATASET):
    """Table 2 rows: [object class, NMI, ARI] per class of ``dataset`` (GT objects), then the mean."""
    res = results.get(dataset, {}).get("gt", {}).get("parts_nmi_ari")
    if not res:
        return []
    classes = [k[len("NMI-"):] for k in res if k.startswith("NMI-")]
    return [[c, _cell(res.get(f"NMI-{c}")), _cell(res.get(f"ARI-{c}"))] for c in classes] + [
        ["mean", _cell(res.get("NMI")), _cell(res.get("ARI"))]]


def write_zero_shot_tables(out, results, skipped, datasets, nmi_ari_dataset=NMI_ARI_DATASET, notes=()):
    """Write ``zero_shot.{md,csv}`` and ``zero_shot_nmi_ari.{md,csv}`` under ``out``; returns both as markdown."""
    os.makedirs(out, exist_ok=True)
    skip_note = f"{len(skipped)} dataset(s) skipped (files not found): {', '.join(skipped)}" if skipped else ""
    how = ("AR@200: class-agnostic, IoU .50:.95; own objects: D^o's predictions own the parts and AR counts "
           "every proposal; GT obj.: GT objects own the parts and AR clips proposals to their union.")
    notes = [n for n in (how, skip_note, *notes) if n]
    write_tables(out, "zero_shot", HEADER, zero_shot_rows(results, skipped, datasets), notes)
    text = ["# Zero-shot part segmentation (Table 3 layout)", ""]
    with open(os.path.join(out, "zero_shot.md")) as f:
        text.append(f.read())
    rows = nmi_ari_rows(results, nmi_ari_dataset)
    if rows:
        write_tables(out, "zero_shot_nmi_ari", ["object class", "NMI", "ARI"], rows,
                     [f"{nmi_ari_dataset}, GT objects (Table 2 layout)"])
        with open(os.path.join(out, "zero_shot_nmi_ari.md")) as f:
            text += ["", f"# Per-class NMI / ARI on {nmi_ari_dataset} (Table 2 layout)", "", f.read()]
    return "\n".join(text)
