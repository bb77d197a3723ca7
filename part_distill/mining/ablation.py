"""Part-mining ablation in the style of the paper's Table 6 / Fig 6: AR of mined parts vs GT parts.

Every row mines the GT objects of a subset of ``parts_world_val_parts`` into a fresh store with one
setting changed from the default (instance-level, cosine, res3+res4, k=4, no CRF), then scores the
store with :func:`evaluate_store` (``PartAREvaluator``, class-agnostic AR@1/AR@10, masks as mined).
Columns are feature sources: the EfficientNet-Lite0 ImageNet backbone, the trained instance
teacher (its backbone levels, or its pixel decoder's mask features) and the RGB+xy baseline.
The default setting is also scored on the real Pascal-Part samples (coarse parts).

One factor at a time keeps the cost linear in the number of settings instead of their product.
"""
import logging
import os
import tempfile
import time
from collections import OrderedDict

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..engine.setup import build_cfg
from ..evaluation.store_predictions import evaluate_store
from ..utils.io import atomic_open
from .miner import mine_parts

__all__ = ["SETTINGS", "SOURCES", "ablation_cfg", "run_ablation", "format_table", "write_report", "pascal_part_samples_dataset"]

logger = logging.getLogger(__name__)

BASE_CONFIG = "configs/parts_world/mine_parts.yaml"
SUBSET_NAME = "mining_ablation_val_parts"
PASCAL_NAME = "mining_ablation_pascal_part_samples"

# (label, opts changed from the default, needs backbone levels)
SETTINGS = [
    ("default: instance, cosine, res3+res4, k=4", [], False),
    ("dataset-level", ["MINING.LEVEL", "dataset"], False),
    ("L2 (not cosine)", ["MINING.METRIC", "l2"], False),
    ("single scale: res4 only", ["MINING.FEATURES", "single", "MINING.FEATURE_LEVELS", "['res4']"], True),
    ("single scale: res3 only", ["MINING.FEATURES", "single", "MINING.FEATURE_LEVELS", "['res3']"], True),
    ("dataset-level, L2, res4 only", ["MINING.LEVEL", "dataset", "MINING.METRIC", "l2", "MINING.FEATURES",
                                      "single", "MINING.FEATURE_LEVELS", "['res4']"], True),
    ("+ dense CRF", ["MINING.CRF.ENABLED", "True"], False),
] + [(f"k={k}", ["MINING.NUM_CLUSTERS", str(k)], False) for k in (2, 3, 5, 6, 7, 8)]

# column name -> how it is built ("teacher" rows need --teacher-weights)
SOURCES = OrderedDict([
    ("EffNet-Lite0 ImageNet", "imagenet"),
    ("teacher res3+res4", "teacher"),
    ("teacher mask features", "teacher_mask"),
    ("RGB+xy", "rgbxy"),
])


def _root():
    # configs/ lives at the repository root, two levels above this package.
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ablation_cfg(source, opts, dataset, out_dir, teacher_weights="", image_size=256):
    """Mining + AR config of one cell; ``None`` where the cell does not apply to ``source``."""
    is_single = "single" in opts
    base = os.path.join(_root(), BASE_CONFIG)
    src = []
    if source == "rgbxy":
        if is_single:
            return None
        src = ["MINING.FEATURES", "rgbxy"]
    elif source in ("teacher", "teacher_mask"):
        if source == "teacher_mask" and is_single:
            return None
        # The teacher's own config describes its architecture; its backbone then gets the checkpoint.
        teacher_cfg = os.path.join(os.path.dirname(teacher_weights), "config.yaml")
        if os.path.isfile(teacher_cfg):
            base = teacher_cfg
        src = ["MODEL.WEIGHTS", teacher_weights, "MODEL.DEVICE", "cpu", "MINING.NORMALIZE", "True"]
        if source == "teacher_mask":
            src += ["MINING.FEATURES", "mask_features"]
        else:
            src += ["MINING.FEATURES", "res3_res4", "MINING.FEATURE_LEVELS", "['res3', 'res4']"]
    cfg = build_cfg(base, [
        "MODEL.DEVICE", "cpu", "MINING.OBJECT_SOURCE", "gt", "MINING.DATASETS", f"('{dataset}',)",
        "MINING.IMAGE_SIZE", str(image_size), "MINING.OUTPUT_DIR", out_dir, "OUTPUT_DIR", out_dir,
        "MINING.LEVEL", "instance", "MINING.METRIC", "cosine", "MINING.NUM_CLUSTERS", "4",
        "MINING.CRF.ENABLED", "False",
        "TEST.PARTS.EVALUATORS", "['PartAREvaluator']", "TEST.PARTS.AR_KS", "[1, 10]",
        "TEST.PARTS.AR_MODES", "['overlap']", "TEST.PARTS.RESTRICT_TO_GT_OBJECT", "['none']",
        *src, *opts])
    return cfg


def _register_subset(name, dicts, metadata_from=None, metadata=None):
    DatasetCatalog.pop(name, None)
    MetadataCatalog.pop(name, None)
    DatasetCatalog.register(name, lambda: [dict(d) for d in dicts])
    meta = dict(metadata or {})
    if metadata_from is not None:
        src = MetadataCatalog.get(metadata_from)
        meta.update({k: getattr(src, k) for k in ("thing_classes", "part_classes", "object_part_classes")})
    MetadataCatalog.get(name).set(**meta)


def pascal_part_samples_dataset(shared_root):
    """Register the two real Pascal-Part samples (coarse parts) under PASCAL_NAME; None if absent."""
    from ..data.datasets.pascal_part import VOC_CLASSES, load_pascal_part, pascal_part_vocabulary
    from ..data.datasets.real_common import object_metadata

    root = os.path.join(shared_root, "data", "pascal_part_samples")
    anno_dir, image_dir = os.path.join(root, "Annotations"), os.path.join(root, "JPEGImages")
    if not os.path.isdir(anno_dir):
        logger.warning("Pascal-Part samples not found at %s: skipping the Pascal-Part column", root)
        return None
    names = sorted(f[:-4] for f in os.listdir(anno_dir) if f.endswith(".mat"))
    dicts = load_pascal_part(image_dir, anno_dir, names, parts="coarse", dataset_name=PASCAL_NAME,
                             num_workers=0)
    vocab = pascal_part_vocabulary("coarse")
    _register_subset(PASCAL_NAME, dicts, metadata=object_metadata(VOC_CLASSES, vocab[0], vocab[1], True))
    return PASCAL_NAME


def _mine_and_score(cfg, dataset):
    t = time.perf_counter()
    mine_parts(cfg, overwrite=True)
    res = evaluate_store(cfg, cfg.MINING.OUTPUT_DIR, dataset, None)["parts_ar"]
    return res["AR@1"], res["AR@10"], time.perf_counter() - t


def run_ablation(output, num_images=40, teacher_weights="", image_size=256, pascal_image_size=512,
                 shared_root=None, work_dir=None, settings=None, sources=None, command=""):
    """Mine and score every (setting, source) cell; writes the markdown table to ``output`` atomically.

    Returns ``{"cells": {(setting, source): (AR@1, AR@10, seconds) | None}, "pascal": {...}, ...}``.
    """
    t0 = time.perf_counter()
    settings = SETTINGS if settings is None else settings
    sources = list(SOURCES) if sources is None else sources
    teacher_ok = bool(teacher_weights) and os.path.isfile(teacher_weights)
    if teacher_weights and not teacher_ok:
        logger.warning("Teacher checkpoint %s does not exist: teacher columns are reported as not available",
                       teacher_weights)
    val = DatasetCatalog.get("parts_world_val_parts")
    if num_images > len(val):
        raise ValueError(f"--num-images {num_images} > {len(val)} images in parts_world_val_parts")
    _register_subset(SUBSET_NAME, val[:num_images], metadata_from="parts_world_val_parts")
    shared_root = shared_root or os.path.join(os.path.dirname(_root()), "shared")
    pascal = pascal_part_samples_dataset(shared_root)

    cells, pascal_cells = {}, {}
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="mining_ablation_") as tmp:
        for col in sources:
            kind = SOURCES[col]
            if kind.startswith("teacher") and not teacher_ok:
                continue
            for label, opts, _ in settings:
                cfg = ablation_cfg(kind, opts, SUBSET_NAME, os.path.join(tmp, "store"), teacher_weights, image_size)
                if cfg is None:
                    continue
                cells[(label, col)] = _mine_and_score(cfg, SUBSET_NAME)
                logger.info("%s | %s: AR@1 %.1f AR@10 %.1f (%.0f s)", label, col, *cells[(label, col)])
            if pascal is not None:
                cfg = ablation_cfg(kind, [], pascal, os.path.join(tmp, "store"), teacher_weights, pascal_image_size)
                pascal_cells[col] = _mine_and_score(cfg, pascal)
    result = {"cells": cells, "pascal": pascal_cells, "sources": sources, "settings": [s[0] for s in settings],
              "teacher_weights": teacher_weights if teacher_ok else "", "num_images": num_images,
              "image_size": image_size, "pascal_image_size": pascal_image_size,
              "wall_s": time.perf_counter() - t0}
    if output:
        write_report(output, result, command)
    return result


BEGIN, END = "<!-- mining-ablation:begin (generated) -->", "<!-- mining-ablation:end -->"


def write_report(path, result, command=""):
    """Replace the generated block of ``path`` (keeping the prose around it), atomically.

    A missing file, or one without the markers, gets a fresh generated block.
    """
    block = "\n".join([
        BEGIN, "", f"Command: `{command}`" if command else "",
        f"{result['num_images']} images of `parts_world_val_parts` (GT objects), mined at long side "
        f"{result['image_size']} px; Pascal-Part samples at {result['pascal_image_size']} px. "
        f"Teacher checkpoint: `{result['teacher_weights'] or 'not available'}`. "
        f"Wall time of the command: {result['wall_s']:.0f} s.", "",
        "AR (%) of the mined parts against the GT parts, class-agnostic, IoU .50:.95, masks as mined.", "",
        format_table(result), END])
    old = open(path).read() if os.path.isfile(path) else ""
    if BEGIN in old and END in old:
        text = old[: old.index(BEGIN)] + block + old[old.index(END) + len(END):]
    else:
        text = "# Part-mining ablation (paper Table 6 / Fig 6)\n\n" + block + "\n"
    with atomic_open(path) as f:
        f.write(text)


def format_table(result):
    """Markdown: one row per setting, AR@1 / AR@10 per feature source; then the Pascal-Part row."""
    cols = result["sources"]
    head = "| setting | " + " | ".join(f"{c} AR@1 | {c} AR@10" for c in cols) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(cols))]
    for label in result["settings"]:
        row = []
        for c in cols:
            cell = result["cells"].get((label, c))
            row += ["n/a", "n/a"] if cell is None else [f"{cell[0]:.1f}", f"{cell[1]:.1f}"]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    if result["pascal"]:
        row = []
        for c in cols:
            cell = result["pascal"].get(c)
            row += ["", "n/a" if cell is None else f"{cell[1]:.1f}"]
        lines.append("| Pascal-Part samples (2 images, default setting) | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
