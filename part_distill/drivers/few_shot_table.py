"""The few-shot table (paper Table 4): stage "supervised" for every (initialisation, % of labels).

One table per target dataset, i.e. per supervised config: ``configs/parts_world/supervised.yaml`` or
``configs/few_shot/{pascal_part,part_imagenet,cityscapes_parts}.yaml`` (that dataset's part vocabulary).
Initialisations are named checkpoints: ``ours`` and ``teacher`` get the paper's row labels, any other
name (``--init NAME=PATH``) is a row of its own, after them in the order given.
Each cell is one ``tools/train_net.py`` run of the supervised config with ``MODEL.WEIGHTS`` = the
initialisation and ``DATASETS.FEW_SHOT.PERCENT`` = the percentage, in
``<out>/<init>/pct<percent>``; it is finished when its ``eval_results.json`` exists, so a rerun
only fills the missing cells (``pipeline.run_steps``). Every run trains for the config's
SOLVER.MAX_ITER iterations, whatever the percentage (the paper's protocol).
The table, rows = initialisation and columns = % of labels, goes to ``<out>/few_shot.md`` and
``<out>/few_shot.json``.
"""
import json
import math
import os
import re

from ..utils.io import atomic_open, atomic_write_json
from .pipeline import Step

__all__ = ["INITS", "DEFAULT_CONFIG", "DEFAULT_PERCENTS", "PAPER_PERCENTS", "init_label", "row_order", "run_dir",
           "build_few_shot_steps",
           "collect_few_shot", "few_shot_markdown", "write_few_shot_table"]

DEFAULT_CONFIG = "configs/parts_world/supervised.yaml"
DEFAULT_PERCENTS = (1.0, 10.0, 100.0)
# Table 4's columns (the parts world's default is shorter: each cell is a training run).
PAPER_PERCENTS = (1.0, 5.0, 10.0, 20.0, 50.0, 100.0)
# Row order and labels, as in Table 4: the instance-segmentation start first, ours last.
INITS = {
    "teacher": "Instance teacher (instance seg.)",
    "ours": "PartDistillation (ours)",
}
# Metrics of a cell: (column label, task of eval_results.json, key).
METRICS = {"mIoU": ("parts_miou", "mIoU"), "AR@200": ("parts_ar", "AR@200")}


# An initialisation's name is also its run folder.
_INIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def init_label(init):
    """The row label of initialisation ``init``: Table 4's for the known ones, else the name itself."""
    return INITS.get(init, init)


def row_order(inits):
    """The known initialisations in Table 4's order, then the others in the order given."""
    inits = list(inits)
    return [i for i in INITS if i in inits] + [i for i in inits if i not in INITS]


def run_dir(out, init, percent):
    return os.path.join(out, init, f"pct{percent:g}")


def build_few_shot_steps(out, weights, percents=DEFAULT_PERCENTS, config=DEFAULT_CONFIG, opts=(), launch=()):
    """One Step per (init, percent); ``weights`` maps an initialisation name (a key of INITS or any
    folder-safe name) to a checkpoint."""
    bad = [i for i in weights if not _INIT_NAME.match(i)]
    if bad:
        raise ValueError(f"initialisation name(s) {bad} must be letters, digits, '_', '.' or '-' "
                         "(they name run folders)")
    steps = []
    for init in row_order(weights):
        if not os.path.isfile(weights[init]):
            raise FileNotFoundError(f"--{init} checkpoint {weights[init]!r} does not exist")
        for p in percents:
            d = run_dir(out, init, p)
            steps.append(Step(
                f"{init}_pct{p:g}",
                ["tools/train_net.py", "--config-file", config, *launch, *opts,
                 "MODEL.WEIGHTS", weights[init], "DATASETS.FEW_SHOT.PERCENT", repr(float(p)), "OUTPUT_DIR", d],
                os.path.join(d, "eval_results.json"),
                f"fine-tune from {init_label(init)} on {p:g}% of the part labels"))
    return steps


def collect_few_shot(out, inits, percents):
    """{init: {percent: {"mIoU": x, "AR@200": y, "train_images": n}}} of the finished cells."""
    results = {}
    for init in inits:
        for p in percents:
            path = os.path.join(run_dir(out, init, p), "eval_results.json")
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                res = json.load(f)
            cell = {name: res.get(task, {}).get(key) for name, (task, key) in METRICS.items()}
            cell["train_images"] = res.get("supervised", {}).get("train_images")
            results.setdefault(init, {})[float(p)] = cell
    return results


def _fmt(x):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def few_shot_markdown(results, percents, dataset="", notes=()):
    """Table 4 layout: one block per metric (mIoU first), rows = init, columns = % of labels."""
    percents = [float(p) for p in percents]
    head = "| Initialisation | Finetune | " + " | ".join(f"{p:g}%" for p in percents) + " |"
    rule = "|---|---|" + "---|" * len(percents)
    blocks = []
    for metric in METRICS:
        lines = [f"**{metric}**", "", head, rule]
        for init in row_order(results):
            label = init_label(init)
            cells = [_fmt(results[init].get(p, {}).get(metric)) for p in percents]
            lines.append(f"| {label} | {dataset} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks + [n for n in notes if n]) + "\n"


def write_few_shot_table(out, results, percents, dataset="", notes=()):
    """Write ``<out>/few_shot.md`` and ``<out>/few_shot.json`` atomically; returns the markdown."""
    text = few_shot_markdown(results, percents, dataset, notes)
    os.makedirs(out, exist_ok=True)
    with atomic_open(os.path.join(out, "few_shot.md")) as f:
        f.write(text)
    atomic_write_json(os.path.join(out, "few_shot.json"), {
        "dataset": dataset, "percents": [float(p) for p in percents],
        "results": {i: {f"{p:g}": c for p, c in r.items()} for i, r in results.items()}, "notes": list(notes)},
        indent=1)
    return text
