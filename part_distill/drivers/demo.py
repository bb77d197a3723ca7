"""The parts-world demo: the step list that ``tools/run_demo.py`` runs and the results report.

Stages hand over through files: the teacher's ``model_final.pth`` feeds mining and the part
decoder, each store's ``manifest.json`` feeds training, each evaluation writes ``eval_results.json``.
"""
import json
import os

from ..data.datasets.parts_world import parts_world_dir
from ..utils.io import atomic_open
from .pipeline import Step

CFG = "configs/parts_world"
VAL_PARTS = "parts_world_val_parts"
# GT parts of the training images: the AR of every training-label set (mined store, each round's labels).
TRAIN_PARTS = "parts_world_train_parts"
SELF_TRAIN_ROUNDS = 2
# Cluster slots per object class (stage 3 and the one-stage baseline; paper: k=8).
CLUSTERS = 8
# Predicted objects scoring below this own no parts (as MINING.OBJECT_SCORE_THRESH of the mined row).
PRED_OBJECT_SCORE = 0.5


def _launch_args(num_gpus):
    return ["--num-gpus", str(num_gpus)] if num_gpus > 1 else []


def build_demo_steps(out, num_gpus=0, teacher_dir=None, mining_opts=()):
    """All steps of the demo in order: the pipeline, the one-stage baseline, the predicted-object evaluations.

    ``teacher_dir``: reuse the instance teacher of that directory (its step is then left out);
    ``mining_opts``: extra KEY VALUE options of every mining step (e.g. another backbone's MODEL.WEIGHTS).
    """
    j = lambda *p: os.path.join(out, *p)  # noqa: E731
    launch = _launch_args(num_gpus)
    teacher_dir = teacher_dir or j("instance_teacher")
    teacher = os.path.join(teacher_dir, "model_final.pth")
    # COCOEvaluator's output of the teacher's final evaluation: the predicted objects of parts_world_val.
    teacher_val_objects = os.path.join(teacher_dir, "inference", "parts_world_val", "coco_instances_results.json")
    steps = [
        Step("parts_world", ["tools/make_parts_world.py", "--contact-sheet", j("contact_sheet.png")],
             j("contact_sheet.png"), "generate the synthetic parts world + contact sheet"),
        Step("instance_teacher",
             ["tools/train_net.py", "--config-file", f"{CFG}/instance_teacher.yaml", "--resume", *launch,
              "OUTPUT_DIR", j("instance_teacher")],
             j("instance_teacher", "eval_results.json"),
             "train the instance teacher on instance labels (CPU, minutes)"),
    ]

    def mine(name, split, text, *opts):
        steps.append(Step(
            name,
            ["tools/mine_parts.py", "--config-file", f"{CFG}/mine_parts.yaml", *launch,
             "MINING.DATASETS", f"('parts_world_{split}',)", *mining_opts, *opts, "MINING.OUTPUT_DIR", j(name.replace("mine_", "mined_")),
             "OUTPUT_DIR", j(name.replace("mine_", "mined_"))],
            j(name.replace("mine_", "mined_"), "manifest.json"), text))

    mine("mine_train", "train", "mine k=4 parts per GT object of parts_world_train")
    mine("mine_val", "val", "mine k=4 parts per GT object of parts_world_val")
    mine("mine_val_pred", "val", "mine k=4 parts per object the teacher predicts on parts_world_val",
         "MINING.OBJECT_SOURCE", "coco_json", "MINING.OBJECT_JSON", teacher_val_objects,
         "MINING.OBJECT_JSON_CONTIGUOUS", "True")
    mine("mine_train_clusters", "train", f"one-stage baseline: k={CLUSTERS} clusters per object class over the dataset",
         "MINING.LEVEL", "dataset", "MINING.NUM_CLUSTERS", str(CLUSTERS))
    for name, store, dataset in (("eval_mined", "mined_val", VAL_PARTS), ("eval_mined_pred", "mined_val_pred", VAL_PARTS),
                                 ("eval_mined_train", "mined_train", TRAIN_PARTS)):
        steps.append(Step(
            name,
            ["tools/evaluate_parts.py", "--store", j(store), "--dataset", dataset,
             "--output", j("eval", name[len("eval_"):])],
            j("eval", name[len("eval_"):], "eval_results.json"), f"evaluate the parts of {store} (no learning)"))
    steps += part_stage_steps(out, teacher, j("mined_train", "manifest.json"), launch,
                              one_stage_manifest=j("mined_train_clusters", "manifest.json"))
    steps += [predicted_object_eval_step(out, stage, launch) for stage in PREDICTED_OBJECT_EVALS]
    world = parts_world_dir()  # the demo runs every step with the default PARTS_WORLD.* settings
    val_images = [os.path.join(world, "images", "val", f"{i:06d}.png") for i in range(4)]
    steps.append(Step(
        "overlays",
        ["tools/demo.py", "--config-file", f"{CFG}/distill.yaml", "--input", *val_images,
         "--output", j("overlays"), "--objects", "gt", "--dataset", VAL_PARTS.replace("_parts", ""),
         "--confidence-threshold", "0.3", "MODEL.WEIGHTS", j("distill", "round_0", "model_final.pth")],
        j("overlays", "predictions.json"), "part overlays of the final model on 4 val images"))
    order = ["parts_world", "instance_teacher", "mine_train", "mine_val", "eval_mined", "eval_mined_train", "mine_val_pred",
             "eval_mined_pred", "proposal", "self_train", "ranking", "distill", "mine_train_clusters", "one_stage",
             *[f"eval_{s}_pred" for s in PREDICTED_OBJECT_EVALS], "overlays"]
    if teacher_dir != j("instance_teacher"):
        steps = [s for s in steps if s.name != "instance_teacher"]
    return sorted(steps, key=lambda s: order.index(s.name))


STAGE_TEXT = {
    "proposal": "stage 2: train the class-agnostic part decoder on the mined parts",
    "self_train": f"stage 2b: {SELF_TRAIN_ROUNDS} self-training rounds (teacher = last student)",
    "ranking": "stage 3: per-class k-means prototypes over part query features (Eq. 2)",
    "distill": "stage 4: final self-training with cluster ids as labels",
    "one_stage": f"baseline: train on the dataset-level cluster ids, then {SELF_TRAIN_ROUNDS} self-training rounds",
}


def part_stage_steps(out, teacher, mined_manifest, launch=(), extra_opts=(), one_stage_manifest=None):
    """The learned stages 2 -> 2b -> 3 -> 4 (and, given its store, the one-stage baseline) under ``out``,
    each a ``tools/train_net.py`` command with ``extra_opts`` (KEY VALUE ...) appended."""
    j = lambda *p: os.path.join(out, *p)  # noqa: E731
    stage_opts = {
        "proposal": ["MODEL.WEIGHTS", teacher, "PART_DISTILL.PSEUDO_LABELS.MANIFEST", mined_manifest],
        "self_train": ["MODEL.WEIGHTS", j("proposal", "model_final.pth")],
        "ranking": ["MODEL.WEIGHTS", j("self_train", f"round_{SELF_TRAIN_ROUNDS - 1}", "model_final.pth")],
        "distill": ["MODEL.WEIGHTS", j("ranking", "model_final.pth")],
    }
    if one_stage_manifest:
        stage_opts["one_stage"] = ["MODEL.WEIGHTS", teacher, "PART_DISTILL.PSEUDO_LABELS.MANIFEST", one_stage_manifest]
    return [Step(stage,
                 ["tools/train_net.py", "--config-file", f"{CFG}/{stage}.yaml", *launch, *opts,
                  "PART_DISTILL.SELF_TRAIN.ROUNDS", str(SELF_TRAIN_ROUNDS),
                  "PART_DISTILL.ONE_STAGE.ROUNDS", str(SELF_TRAIN_ROUNDS), *extra_opts, "OUTPUT_DIR", j(stage)],
                 j(stage, "eval_results.json"), STAGE_TEXT[stage])
            for stage, opts in stage_opts.items()]


def predicted_object_eval_step(out, stage, launch=(), extra_opts=()):
    """The evaluation of ``stage``'s model under ``out`` with D^o's objects (score >= PRED_OBJECT_SCORE)."""
    j = lambda *p: os.path.join(out, *p)  # noqa: E731
    return Step(
        f"eval_{stage}_pred",
        ["tools/train_net.py", "--config-file", f"{CFG}/{stage}.yaml", "--eval-only", *launch,
         "MODEL.WEIGHTS", j(PREDICTED_OBJECT_EVALS[stage]), *extra_opts, "MODEL.PART_DISTILL.OBJECTS", "predicted",
         "MODEL.PART_DISTILL.TEST.OBJECT_SCORE_THRESH", str(PRED_OBJECT_SCORE), "OUTPUT_DIR", j("eval", f"{stage}_pred")],
        j("eval", f"{stage}_pred", "eval_results.json"),
        f"evaluate the {stage} model with the teacher's predicted objects instead of GT objects")


# Models whose parts depend on which objects own them get a second evaluation with predicted objects.
PREDICTED_OBJECT_EVALS = {
    "ranking": "ranking/model_final.pth",
    "distill": "distill/round_0/model_final.pth",
    "one_stage": f"one_stage/round_{SELF_TRAIN_ROUNDS - 1}/model_final.pth",
}

# rows of the results table: (label, evaluation with GT objects, evaluation with predicted objects),
# files relative to the demo output. Class-agnostic rows have no predicted-object evaluation: the part
# decoder reads crops of the owner objects, so their GT-object run says nothing about predicted objects.
RESULT_ROWS = [
    ("mined parts only (no learning)", "eval/mined/eval_results.json", "eval/mined_pred/eval_results.json"),
    ("one-stage baseline (dataset-level clusters + self-training)", "one_stage/eval_results.json",
     "eval/one_stage_pred/eval_results.json"),
    ("part proposal learning (stage 2)", "proposal/eval_results.json", None),
] + [
    (f"self-training round {r + 1}", f"self_train/round_{r}/round.json", None) for r in range(SELF_TRAIN_ROUNDS)
] + [
    ("class-specific ranking (stage 3)", "ranking/eval_results.json", "eval/ranking_pred/eval_results.json"),
    ("final distillation (stage 4)", "distill/eval_results.json", "eval/distill_pred/eval_results.json"),
]


# Stage-2 models are class-agnostic (no cluster ids): their mIoU/NMI/ARI are not defined, not 0.
CLASS_AGNOSTIC_ROWS = ("part proposal learning", "self-training round")
CLUSTER_METRICS = ("mIoU", "NMI", "ARI")


def _fmt(x):
    return "n/a" if x is None else f"{x:.1f}"


def _read_flat(path):
    with open(path) as f:
        res = json.load(f)
    if path.endswith("round.json"):  # a self-training round keeps its evaluation inside
        res = res.get("eval") or {}
    return _flatten(res)


def _flatten(res):
    """{task: {metric: value}} -> {metric: value}."""
    flat = {}
    for task in res.values():
        if isinstance(task, dict):
            flat.update(task)
    return flat


def collect_results(out):
    """[(label, {metric: value})] for every finished evaluation of the demo; metrics of the
    predicted-object evaluation carry the suffix "-pred"."""
    rows = []
    for label, rel, pred_rel in RESULT_ROWS:
        path = os.path.join(out, rel)
        if not os.path.exists(path):
            continue
        flat = _read_flat(path)
        if label.startswith(CLASS_AGNOSTIC_ROWS):
            flat = {k: v for k, v in flat.items() if k.split("-")[0] not in CLUSTER_METRICS}
        elif pred_rel and os.path.exists(os.path.join(out, pred_rel)):
            flat.update({f"{k}-pred": v for k, v in _read_flat(os.path.join(out, pred_rel)).items()})
        labels_ar = _training_labels_ar(out, label, path)
        if labels_ar is not None:
            flat["labels-AR@200"] = labels_ar
        rows.append((label, flat))
    return rows


def _training_labels_ar(out, label, path):
    """AR@200 (GT objects) on the train images of the labels a row trained on: the mined store for the
    mined row and stage 2, a round's own labels for a self-training round (None where not measured)."""
    if path.endswith("round.json"):
        with open(path) as f:
            labels_eval = json.load(f).get("labels", {}).get("eval") or {}
        return _flatten(labels_eval).get("AR@200-gtobj_union")
    mined_train = os.path.join(out, "eval", "mined_train", "eval_results.json")
    if label.startswith(("mined parts only", "part proposal")) and os.path.exists(mined_train):
        return _read_flat(mined_train).get("AR@200-gtobj_union")
    return None


COLUMNS = [("AR@200 pred. obj.", "AR@200-pred"), ("mIoU pred. obj.", "mIoU-pred"),
           ("AR@200 GT obj.", "AR@200-gtobj_union"), ("mIoU GT obj.", "mIoU"), ("NMI", "NMI"), ("ARI", "ARI"),
           ("fit IoU (train)", "mean_best_iou"), ("train-labels AR@200", "labels-AR@200")]


def _fmt_metric(key, x):
    # The fit is a mean IoU in [0, 1]; every other column is a percentage.
    return f"{x:.2f}" if key == "mean_best_iou" and x is not None else _fmt(x)


def results_markdown(rows):
    lines = ["| method | " + " | ".join(c for c, _ in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for label, m in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt_metric(k, m.get(k)) for _, k in COLUMNS) + " |")
    return "\n".join(lines)


AR_KS = (1, 10, 50, 100, 200)


def _plot_ar(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=100)
    for label, m in rows:
        ys = [m.get(f"AR@{k}-gtobj_union") for k in AR_KS]
        if all(y is not None for y in ys):
            ax.plot(AR_KS, ys, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("k (proposals per image)")
    ax.set_ylabel("AR@k, GT objects (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def _plot_class_miou(label, m, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # GT-object evaluation only (the "-pred" twins are the predicted-object run of the same model).
    per_class = {k[len("mIoU-"):]: v for k, v in m.items() if k.startswith("mIoU-") and not k.endswith("-pred")}
    if not per_class:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.0), dpi=100)
    ax.bar(list(per_class), list(per_class.values()))
    ax.set_ylabel("mIoU (%)")
    ax.set_title(f"per-class mIoU: {label}", fontsize=9)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return True


def _write_html(out, text_md, rows):
    """report.html: the tables, AR-vs-k, per-class mIoU, contact sheet and overlays."""
    import html

    _plot_ar(rows, os.path.join(out, "ar_vs_k.png"))
    figs = ["ar_vs_k.png"]
    if rows and _plot_class_miou(rows[-1][0], rows[-1][1], os.path.join(out, "class_miou.png")):
        figs.append("class_miou.png")
    overlay_dir = os.path.join(out, "overlays")
    if os.path.isdir(overlay_dir):
        figs += [os.path.join("overlays", f) for f in sorted(os.listdir(overlay_dir)) if f.endswith(".png")]
    figs.append("contact_sheet.png")
    body = ["<html><head><meta charset='utf-8'><title>part_distill demo</title>",
            "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px}img{max-width:100%;margin:8px 0}"
            ".failed{border:2px solid #c00;background:#fee;padding:8px}</style></head><body>"]
    for line in text_md.splitlines():
        if line.startswith("|") and "---" not in line:
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1><table>")
        elif line.startswith("> "):
            body.append(f"</table><p class='failed'>{html.escape(line[2:])}</p><table>")
        elif line.strip() and "---" not in line:
            body.append(f"</table><p>{html.escape(line)}</p><table>")
    body.append("</table>")
    body += [f"<img src='{html.escape(f)}'>" for f in figs if os.path.exists(os.path.join(out, f))]
    body.append("</body></html>")
    with atomic_open(os.path.join(out, "report.html")) as f:
        f.write("\n".join(body))


def update_readme(readme, text, block="demo-results"):
    """Replace the block between the ``<!-- {block}:start/end -->`` markers of a markdown file with ``text``
    (if the file and the markers exist)."""
    start, end = f"<!-- {block}:start -->", f"<!-- {block}:end -->"
    if not os.path.exists(readme):
        return False
    with open(readme) as f:
        content = f.read()
    if start not in content or end not in content:
        return False
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    with atomic_open(readme) as f:
        f.write(f"{head}{start}\n{text}\n{end}{tail}")
    return True


def write_demo_report(out, timings=None, readme=None, failed=None):
    """Write <out>/results.md and report.html (metrics of every finished stage on parts_world_val_parts); return it.

    ``failed``: the ``pipeline.StepFailed`` that stopped the run, named (with its log) at the top of
    both; ``readme`` is then left alone, since its block is meant to show a complete run.
    """
    teacher = os.path.join(out, "instance_teacher", "eval_results.json")
    text = ["# part_distill demo results (parts_world_val_parts)", ""]
    if failed is not None:
        text += [f"> Incomplete run: step {failed.step} failed (log: {failed.log_path}). The rows below are "
                 "the steps that finished; run the demo again to resume at the failed step.", ""]
    if os.path.exists(teacher):
        with open(teacher) as f:
            segm = json.load(f).get("segm", {})
        text += [f"Instance teacher: COCO mask AP {_fmt(segm.get('AP'))}, AP50 {_fmt(segm.get('AP50'))} "
                 "on parts_world_val.", ""]
    text += [results_markdown(collect_results(out)), "",
             "pred. obj.: parts belong to the teacher's predicted objects (score >= 0.5) and AR counts every "
             "proposal; GT obj.: parts belong to the ground-truth objects and AR clips proposals to their union "
             "(NMI/ARI with GT objects). n/a: a class-agnostic model has no cluster ids, its parts are not "
             "evaluated with predicted objects (the part decoder reads crops of the owner objects), and fit / "
             "train-labels AR are shown for the stages that train on labels. fit IoU: mean best IoU of the "
             "model's masks with its own training labels on 16 training images; train-labels AR@200: the AR of "
             "those labels on the training images' GT parts.", ""]
    ran = {k: v for k, v in (timings or {}).items() if v != "skipped"}
    if ran:
        text += ["Wall times of the steps (as last run, timings.json): "
                 + ", ".join(f"{k} {v:.0f}s" for k, v in ran.items()), ""]
    text = "\n".join(text)
    with atomic_open(os.path.join(out, "results.md")) as f:
        f.write(text)
    _write_html(out, text, collect_results(out))
    if readme and failed is None:
        update_readme(readme, text.replace("# part_distill demo results", "Demo results").replace(
            "\n\n", "\n\n", 1))
    return text
