"""The few-shot table (paper Table 4): stage "supervised" for every (initialisation, % of labels).

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

from ..utils.io import atomic_open, atomic_write_json
from .pipeline import Step

__all__ = ["INITS", "DEFAULT_CONFIG", "DEFAULT_PERCENTS", "run_dir", "build_few_shot_steps",
           "collect_few_shot", "few_shot_markdown", "write_few_shot_table"]

DEFAULT_CONFIG = "configs/parts_world/supervised.yaml"
DEFAULT_PERCENTS = (1.0, 10.0, 100.0)
# Row order and labels, as in Table 4: the instance-segmentation start first, ours last.
INITS = {
    "teacher": "Instance teacher (instance seg.)",
    "ours": "PartDistillation (ours)",
}
# Metrics of a cell: (column label, task of eval_results.json, key).
METRICS = {"mIoU": ("parts_miou", "mIoU"), "AR@200": ("parts_ar", "AR@200")}


def run_dir(out, init, percent):
    return os.path.join(out, init, f"pct{percent:g}")


def build_few_shot_steps(out, weights, percents=DEFAULT_PERCENTS, config=DEFAULT_CONFIG, opts=(), launch=()):
    """One Step per (init, percent); ``weights`` maps init name (a key of INITS) to a checkpoint."""
    unknown = sorted(set(weights) - set(INITS))
    if unknown:
        raise ValueError(f"unknown initialisation(s) {unknown}; expected some of {sorted(INITS)}")
    steps = []
    for init in (i for i in INITS if i in weights):
        if not os.path.isfile(weights[init]):
            raise FileNotFoundError(f"--{init} checkpoint {weights[init]!r} does not exist")
        for p in percents:
            d = run_dir(out, init, p)
            steps.append(Step(
                f"{init}_pct{p:g}",
                ["tools/train_net.py", "--config-file", config, *launch, *opts,
                 "MODEL.WEIGHTS", weights[init], "DATASETS.FEW_SHOT.PERCENT", repr(float(p)), "OUTPUT_DIR", d],
                os.path.join(d, "eval_results.json"),
                f"fine-tune from {INITS[init]} on {p:g}% of the part labels"))
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
        for init, label in INITS.items():
            if init not in results:
                continue
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
