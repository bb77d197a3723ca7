"""The parts-world demo: the step list that ``tools/run_demo.py`` runs and the results report.

Stages hand over through files: the teacher's ``model_final.pth`` feeds mining and the part
decoder, each store's ``manifest.json`` feeds training, each evaluation writes ``eval_results.json``.
"""
import json
import os

from ..utils.io import atomic_open
from .pipeline import Step

CFG = "configs/parts_world"
VAL_PARTS = "parts_world_val_parts"
SELF_TRAIN_ROUNDS = 2


def _launch_args(num_gpus):
    return ["--num-gpus", str(num_gpus)] if num_gpus > 1 else []


def build_demo_steps(out, num_gpus=0):
    """All steps of the demo in order (later stages are appended as they exist in configs/)."""
    j = lambda *p: os.path.join(out, *p)  # noqa: E731
    launch = _launch_args(num_gpus)
    teacher = j("instance_teacher", "model_final.pth")
    steps = [
        Step("parts_world", ["tools/make_parts_world.py", "--contact-sheet", j("contact_sheet.png")],
             j("contact_sheet.png"), "generate the synthetic parts world + contact sheet"),
        Step("instance_teacher",
             ["tools/train_net.py", "--config-file", f"{CFG}/instance_teacher.yaml", "--resume", *launch,
              "OUTPUT_DIR", j("instance_teacher")],
             j("instance_teacher", "eval_results.json"),
             "train the instance teacher on instance labels (CPU, minutes)"),
    ]
    for split in ("train", "val"):
        steps.append(Step(
            f"mine_{split}",
            ["tools/mine_parts.py", "--config-file", f"{CFG}/mine_parts.yaml", *launch,
             "MINING.DATASETS", f"('parts_world_{split}',)", "MINING.OUTPUT_DIR", j(f"mined_{split}"),
             "OUTPUT_DIR", j(f"mined_{split}")],
            j(f"mined_{split}", "manifest.json"), f"mine k=4 parts per GT object of parts_world_{split}"))
    stage_opts = {
        "proposal": ["MODEL.WEIGHTS", teacher,
                     "PART_DISTILL.PSEUDO_LABELS.MANIFEST", j("mined_train", "manifest.json")],
        "self_train": ["MODEL.WEIGHTS", j("proposal", "model_final.pth")],
        "ranking": ["MODEL.WEIGHTS", j("self_train", f"round_{SELF_TRAIN_ROUNDS - 1}", "model_final.pth")],
        "distill": ["MODEL.WEIGHTS", j("ranking", "model_final.pth")],
    }
    stage_text = {
        "proposal": "stage 2: train the class-agnostic part decoder on the mined parts",
        "self_train": f"stage 2b: {SELF_TRAIN_ROUNDS} self-training rounds (teacher = last student)",
        "ranking": "stage 3: per-class k-means prototypes over part query features (Eq. 2)",
        "distill": "stage 4: final self-training with cluster ids as labels",
    }
    for stage, opts in stage_opts.items():
        steps.append(Step(
            stage,
            ["tools/train_net.py", "--config-file", f"{CFG}/{stage}.yaml", *launch, *opts,
             "PART_DISTILL.SELF_TRAIN.ROUNDS", str(SELF_TRAIN_ROUNDS), "OUTPUT_DIR", j(stage)],
            j(stage, "eval_results.json"), stage_text[stage]))
    steps.append(Step(
        "eval_mined",
        ["tools/evaluate_parts.py", "--store", j("mined_val"), "--dataset", VAL_PARTS,
         "--output", j("eval", "mined")],
        j("eval", "mined", "eval_results.json"), "evaluate mined parts only (no learning)"))
    order = ["parts_world", "instance_teacher", "mine_train", "mine_val", "eval_mined",
             "proposal", "self_train", "ranking", "distill"]
    return sorted(steps, key=lambda s: order.index(s.name))


# rows of the results table: (label, eval_results.json relative to the demo output)
RESULT_ROWS = [
    ("mined parts only (no learning)", "eval/mined/eval_results.json"),
    ("part proposal learning (stage 2)", "proposal/eval_results.json"),
] + [
    (f"self-training round {r + 1}", f"self_train/round_{r}/round.json") for r in range(SELF_TRAIN_ROUNDS)
] + [
    ("class-specific ranking (stage 3)", "ranking/eval_results.json"),
    ("final distillation (stage 4)", "distill/eval_results.json"),
]


def _fmt(x):
    return "–" if x is None else f"{x:.1f}"


def collect_results(out):
    """[(label, {metric: value})] for every finished evaluation of the demo."""
    rows = []
    for label, rel in RESULT_ROWS:
        path = os.path.join(out, rel)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            res = json.load(f)
        if path.endswith("round.json"):  # a self-training round keeps its evaluation inside
            res = res.get("eval") or {}
        flat = {}
        for task in res.values():
            flat.update(task)
        rows.append((label, flat))
    return rows


def results_markdown(rows):
    cols = [("AR@200", "AR@200"), ("AR@200 (GT obj)", "AR@200-gtobj_union"), ("mIoU", "mIoU"),
            ("NMI", "NMI"), ("ARI", "ARI")]
    lines = ["| method | " + " | ".join(c for c, _ in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for label, m in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt(m.get(k)) for _, k in cols) + " |")
    return "\n".join(lines)


def write_demo_report(out, timings=None):
    """Write <out>/results.md (metrics of every finished stage on parts_world_val_parts); return it."""
    teacher = os.path.join(out, "instance_teacher", "eval_results.json")
    text = ["# part_distill demo results (parts_world_val_parts)", ""]
    if os.path.exists(teacher):
        with open(teacher) as f:
            segm = json.load(f).get("segm", {})
        text += [f"Instance teacher: COCO mask AP {_fmt(segm.get('AP'))}, AP50 {_fmt(segm.get('AP50'))} "
                 "on parts_world_val.", ""]
    text += [results_markdown(collect_results(out)), ""]
    if timings:
        text += ["Step wall times: " + ", ".join(
            f"{k} {'skipped' if v == 'skipped' else f'{v:.0f}s'}" for k, v in timings.items()), ""]
    text = "\n".join(text)
    with atomic_open(os.path.join(out, "results.md")) as f:
        f.write(text)
    return text
