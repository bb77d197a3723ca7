"""The learning ablation (docs/learning.md): what lets the part decoder learn its pseudo-labels.

Each variant reruns the learned stages 2 -> 2b -> 3 -> 4 of ``make demo`` (same teacher, same mined
store, read from the demo's output) with a few config overrides, under ``<output>/<variant>/``; the
default variant (the shipped configs) is the demo's own run, read from the demo's output;
the table reads what each stage wrote (fit to its labels, AR@200 with GT objects, the final mIoU /
NMI / ARI) and the wall minutes of its steps. Finished steps are skipped, so the command resumes.
"""
import dataclasses
import os

from ..utils.io import atomic_open
from .demo import SELF_TRAIN_ROUNDS, _fmt, _read_flat, part_stage_steps, predicted_object_eval_step, update_readme
from .pipeline import read_timings

__all__ = ["VARIANTS", "DEFAULT_VARIANT", "build_ablation_steps", "ablation_rows", "ablation_markdown",
           "plot_tradeoff", "write_ablation_table"]

# The schedule before this ablation (proposal.yaml / self_train.yaml of commit 6bf2c9b).
_OLD_SCHEDULE = ["SOLVER.BASE_LR", "0.0003", "SOLVER.MAX_ITER", "150", "SOLVER.STEPS", "(130,)",
                 "PART_DISTILL.SELF_TRAIN.ITERS_PER_ROUND", "80"]
_FULL_IMAGE = ["MODEL.PART_DISTILL.OBJECT_CROP.ENABLED", "False"]

# name -> (description, KEY VALUE overrides of every stage); no override = the shipped configs.
VARIANTS = {
    "previous": ("whole images, encoder frozen, previous schedule (150 it, lr 3e-4)",
                 [*_FULL_IMAGE, "MODEL.PART_DISTILL.FREEZE", "encoder", *_OLD_SCHEDULE]),
    "full_encoder": ("whole images, encoder frozen, new schedule", [*_FULL_IMAGE, "MODEL.PART_DISTILL.FREEZE", "encoder"]),
    "full_reference": ("whole images, reference freezing (mask branch trains, shared with D^o), new schedule",
                       [*_FULL_IMAGE, "MODEL.PART_DISTILL.FREEZE", "reference"]),
    "full_part_branch": ("whole images, ours (part pixel decoder trains, D^o frozen), new schedule",
                         [*_FULL_IMAGE, "MODEL.PART_DISTILL.FREEZE", "part_branch"]),
    "crop_encoder": ("object crops, encoder frozen, new schedule", ["MODEL.PART_DISTILL.FREEZE", "encoder"]),
    "crop_reference": ("object crops, reference freezing, new schedule", ["MODEL.PART_DISTILL.FREEZE", "reference"]),
    "crop_part_branch": ("object crops, ours (part pixel decoder), new schedule = the shipped default", []),
    "crop_ema_teacher": ("the default with an EMA teacher between rounds (decay 0.99)",
                         ["PART_DISTILL.SELF_TRAIN.TEACHER", "ema"]),
}
DEFAULT_VARIANT = "crop_part_branch"
# The steps whose wall time is the row's CPU minutes.
STAGES = ("proposal", "self_train", "ranking", "distill")


def _variant_dir(out, name, demo_out):
    # The shipped configs are exactly what the demo ran: its stages are the default row.
    return demo_out if name == DEFAULT_VARIANT else os.path.join(out, name)


def build_ablation_steps(out, demo_out, variants, num_gpus=0):
    """The steps of ``variants`` (names of VARIANTS), reusing the teacher and mined store of ``demo_out``."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown ablation variants {unknown}; known: {sorted(VARIANTS)}")
    teacher = os.path.join(demo_out, "instance_teacher", "model_final.pth")
    mined = os.path.join(demo_out, "mined_train", "manifest.json")
    for path in (teacher, mined):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: run `make demo` (or tools/run_demo.py --output {demo_out} "
                                    "--until eval_mined) first; the ablation reuses its teacher and mined store")
    launch = ["--num-gpus", str(num_gpus)] if num_gpus > 1 else []
    steps = []
    for v in variants:
        d = _variant_dir(out, v, demo_out)
        # Stage 4 with D^o's objects too: what each freezing does to the objects that own the parts.
        for step in part_stage_steps(d, teacher, mined, launch, extra_opts=VARIANTS[v][1]) + [
                predicted_object_eval_step(d, "distill", launch, extra_opts=VARIANTS[v][1])]:
            steps.append(dataclasses.replace(step, name=f"{v}.{step.name}", description=f"{v}: {step.description}"))
    return steps


def _maybe(path):
    return _read_flat(path) if os.path.exists(path) else {}


def ablation_rows(out, variants, demo_out):
    """[(variant, {column: value})] from what each variant's stages wrote."""
    # The default row's steps ran either here or inside the demo (under their plain stage names).
    timings = {f"{DEFAULT_VARIANT}.{k}": t for k, t in read_timings(demo_out).items()}
    timings.update(read_timings(out))
    rows = []
    for v in variants:
        d = _variant_dir(out, v, demo_out)
        proposal = _maybe(os.path.join(d, "proposal", "eval_results.json"))
        last = _maybe(os.path.join(d, "self_train", f"round_{SELF_TRAIN_ROUNDS - 1}", "round.json"))
        distill = _maybe(os.path.join(d, "distill", "eval_results.json"))
        distill_pred = _maybe(os.path.join(d, "eval", "distill_pred", "eval_results.json"))
        secs = [timings[f"{v}.{stage}"] for stage in STAGES if f"{v}.{stage}" in timings]
        rows.append((v, {
            "fit IoU (train)": proposal.get("mean_best_iou"),
            "AR@200 stage 2": proposal.get("AR@200-gtobj_union"),
            f"AR@200 self-training r{SELF_TRAIN_ROUNDS}": last.get("AR@200-gtobj_union"),
            "AR@200 stage 4": distill.get("AR@200-gtobj_union"),
            "mIoU stage 4": distill.get("mIoU"), "NMI": distill.get("NMI"), "ARI": distill.get("ARI"),
            "AR@200 stage 4 pred. obj.": distill_pred.get("AR@200"), "mIoU stage 4 pred. obj.": distill_pred.get("mIoU"),
            "CPU min": sum(secs) / 60.0 if secs else None,
        }))
    return rows


def ablation_markdown(rows, mined=None):
    cols = list(rows[0][1]) if rows else []
    lines = ["| variant | what | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for v, m in rows:
        cells = [f"{m[c]:.2f}" if c.startswith("fit") and m[c] is not None else _fmt(m[c]) for c in cols]
        lines.append(f"| {v} | {VARIANTS[v][0]} | " + " | ".join(cells) + " |")
    if mined:
        lines += ["", f"Mined parts (the stage-2 training store's val twin, no learning): AR@200 "
                      f"{_fmt(mined.get('AR@200-gtobj_union'))}, mIoU {_fmt(mined.get('mIoU'))}, GT objects."]
    return "\n".join(lines)


def plot_tradeoff(rows, path, mined_ar=None):
    """Stage-4 AR@200 against the stages' CPU minutes, one point per variant (PNG, atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=100)
    for v, m in rows:
        if m["CPU min"] is not None and m["AR@200 stage 4"] is not None:
            ax.scatter(m["CPU min"], m["AR@200 stage 4"])
            ax.annotate(v, (m["CPU min"], m["AR@200 stage 4"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if mined_ar is not None:
        ax.axhline(mined_ar, color="gray", linestyle="--", linewidth=1, label="mined parts (no learning)")
        ax.legend(fontsize=7)
    ax.set_xlabel("CPU minutes of stages 2-4 (2 cores)")
    ax.set_ylabel("AR@200 of stage 4, GT objects (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def write_ablation_table(out, demo_out, variants, doc=None, plot=None):
    """<out>/ablation.md and tradeoff.png (and the block between the ablation markers of ``doc``, and the
    plot at ``plot`` too); returns the table."""
    rows = ablation_rows(out, variants, demo_out)
    mined = _maybe(os.path.join(demo_out, "eval", "mined", "eval_results.json"))
    for path in [os.path.join(out, "tradeoff.png")] + ([plot] if plot else []):
        plot_tradeoff(rows, path, mined.get("AR@200-gtobj_union"))
    text = ablation_markdown(rows, mined)
    with atomic_open(os.path.join(out, "ablation.md")) as f:
        f.write(text + "\n")
    if doc:
        update_readme(doc, text, block="learning-ablation")
    return text
