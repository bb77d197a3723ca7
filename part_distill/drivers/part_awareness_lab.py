"""The part-awareness lab table (issue: PARTICLE + probes): does adapting the backbone help mining?

Steps (each a user-facing command, skipped when its result exists, see ``pipeline.py``):
  1. PARTICLE on the parts world (``configs/parts_world/particle.yaml``), one checkpoint per iteration;
  2. the probes (``tools/probe_backbone.py``) of the ImageNet backbone and of every PARTICLE iteration:
     grouping AR@1/AR@10 of k-means parts in GT objects, linear part mIoU, part retrieval mAP;
  3. the PartDistillation pipeline of the demo (its teacher reused) with parts mined from the last
     PARTICLE backbone, beside the demo's own run with ImageNet features.
The table joins the probe rows with the pipeline's mined-part and final (stage 4) metrics.
"""
import json
import os

from ..evaluation.base import write_tables
from ..probes.report import COLUMNS as PROBE_COLUMNS
from ..probes.report import RESULTS_FILE, load_rows
from .demo import build_demo_steps
from .pipeline import Step

__all__ = ["build_lab_steps", "lab_rows", "write_lab_table", "IMAGENET_LABEL", "PIPELINE_STEPS"]

IMAGENET_LABEL = "EfficientNet-Lite0 ImageNet"
# The demo steps that make the final PartDistillation model from a mined store.
PIPELINE_STEPS = ("mine_train", "mine_val", "eval_mined", "proposal", "self_train", "ranking", "distill")


def particle_label(i):
    return f"+ PARTICLE iteration {i + 1}"


def build_lab_steps(out, demo_out, iterations=3, num_gpus=0):
    """Steps of the lab; ``demo_out`` is the ImageNet pipeline (make demo's output, reused or run)."""
    particle = os.path.join(out, "particle")
    launch = ["--num-gpus", str(num_gpus)] if num_gpus > 1 else []
    ckpts = [os.path.join(particle, f"iter_{i}", "model_final.pth") for i in range(iterations)]
    steps = [s for s in build_demo_steps(demo_out, num_gpus=num_gpus)
             if s.name in ("parts_world", "instance_teacher") + PIPELINE_STEPS]
    for s in steps:
        s.name = f"imagenet_{s.name}" if s.name in PIPELINE_STEPS else s.name
    steps.append(Step("particle", ["tools/train_net.py", "--config-file", "configs/parts_world/particle.yaml", *launch,
                                   "PARTICLE.ITERATIONS", str(iterations), "OUTPUT_DIR", particle],
                      os.path.join(particle, "manifest.json"),
                      f"PARTICLE: {iterations} iterations of part discovery + part-contrastive training"))
    weights = [f"{IMAGENET_LABEL}="] + [f"{particle_label(i)}={c}" for i, c in enumerate(ckpts)]
    steps.append(Step("probes", ["tools/probe_backbone.py", "--config-file", "configs/parts_world/probe.yaml",
                                 "--output", os.path.join(out, "probes"), "--fresh",
                                 *[a for w in weights for a in ("--weights", w)]],
                      os.path.join(out, "probes", RESULTS_FILE),
                      "probes of the ImageNet backbone and of every PARTICLE iteration"))
    adapted = build_demo_steps(os.path.join(out, "pipeline_particle"), num_gpus=num_gpus,
                               teacher_dir=os.path.join(demo_out, "instance_teacher"),
                               mining_opts=("MODEL.WEIGHTS", ckpts[-1]))
    for s in adapted:
        if s.name in PIPELINE_STEPS:
            s.name = f"particle_{s.name}"
            steps.append(s)
    return steps


def _metrics(path):
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        res = json.load(f)
    flat = {}
    for task in res.values():
        if isinstance(task, dict):
            flat.update(task)
    return flat


PIPELINE_COLUMNS = (("mined AR@10 (val)", "mined", "AR@10-gtobj_union"),
                    ("final mIoU", "final", "mIoU"), ("final NMI", "final", "NMI"), ("final ARI", "final", "ARI"))


def lab_rows(out, demo_out, iterations=3):
    """[{label, probe metrics..., pipeline metrics...}] in table order."""
    probes = {r["label"]: r for r in load_rows(os.path.join(out, "probes"))}
    pipelines = {IMAGENET_LABEL: demo_out, particle_label(iterations - 1): os.path.join(out, "pipeline_particle")}
    rows = []
    for label in [IMAGENET_LABEL] + [particle_label(i) for i in range(iterations)]:
        row = {"label": label, **{key: probes.get(label, {}).get(key) for _, key in PROBE_COLUMNS}}
        if label in pipelines:
            base = pipelines[label]
            got = {"mined": _metrics(os.path.join(base, "eval", "mined", "eval_results.json")),
                   "final": _metrics(os.path.join(base, "distill", "eval_results.json"))}
            row.update({header: got[src].get(key) for header, src, key in PIPELINE_COLUMNS})
        rows.append(row)
    return rows


def _cell(v):
    return "—" if v is None else round(float(v), 2)


def write_lab_table(out, demo_out, iterations=3):
    rows = lab_rows(out, demo_out, iterations)
    header = ["backbone", *(h for h, _ in PROBE_COLUMNS), *(h for h, _, _ in PIPELINE_COLUMNS)]
    table = [[r["label"], *(_cell(r.get(k)) for _, k in PROBE_COLUMNS), *(_cell(r.get(h)) for h, _, _ in PIPELINE_COLUMNS)]
             for r in rows]
    notes = ["AR@1, AR@10, linear mIoU, retrieval mAP: tools/probe_backbone.py (configs/parts_world/probe.yaml) "
             "on parts_world_val_parts, frozen backbone. mined AR@10 (val): the pipeline's mined val store, GT objects "
             "(same protocol as the probe's AR@10). final: stage-4 model of the PartDistillation pipeline whose parts "
             "were mined with that backbone (teacher, decoder and schedule unchanged), mIoU/NMI/ARI with GT objects. "
             "— : not run (the full pipeline runs for the ImageNet and the last PARTICLE backbone only)."]
    write_tables(out, "part_awareness", header, table, notes)
    with open(os.path.join(out, "part_awareness.md")) as f:
        return f.read()
