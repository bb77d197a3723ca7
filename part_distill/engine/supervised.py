"""Stage "supervised": few-shot fine-tuning on real part labels (paper Sec 5.3, Table 4).

The part decoder D^p is trained as a supervised part segmenter (``SupervisedPartModel``) on the
``*_parts`` datasets of ``DATASETS.TRAIN`` (already cut to ``DATASETS.FEW_SHOT.PERCENT`` by
``build_cfg``): every GT part becomes a target whose label is its part category. The model starts
from ``MODEL.WEIGHTS``:

* a PartDistillation checkpoint ("ours"): everything loads except the part classification layer,
  whose shape differs (stage-4 slots vs part categories); it is re-initialised and logged;
* the instance teacher: D^p is missing from it and starts fresh, as in stage 2.

Any other shape mismatch is an error (it would silently drop trained weights). Training resumes
from ``OUTPUT_DIR``'s last checkpoint; the final model is evaluated on ``DATASETS.TEST`` (mIoU with
``TEST.PARTS.ASSOCIATION identity``: predicted part category vs GT part category).
"""
import logging

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils import comm

from ..data.few_shot import few_shot_train_datasets
from ..modeling.meta_arch.supervised_parts import SupervisedPartModel  # noqa: F401  (registers it)
from .self_training import with_overrides
from .stage_eval import evaluate_stage
from .trainer import PartDistillTrainer

__all__ = ["run_supervised", "part_target_dicts", "register_part_targets", "dataset_part_classes",
           "check_initialisation", "SUPERVISED_META_ARCH", "PART_CATEGORY_KEY", "REINITIALISED_KEYS"]

logger = logging.getLogger(__name__)

SUPERVISED_META_ARCH = "SupervisedPartModel"
PART_MAPPER = "PartTargetLSJMapper"
# In the flattened part-target dicts, each annotation's category_id is its part category.
PART_CATEGORY_KEY = "category_id"
# State-dict keys that depend on NUM_PART_CLASSES: the only ones allowed to mismatch MODEL.WEIGHTS.
REINITIALISED_KEYS = ("part_predictor.class_embed.weight", "part_predictor.class_embed.bias",
                      "part_criterion.empty_weight")
# Buffers the supervised model carries but never reads (it predicts categories, not ranked clusters): a
# checkpoint whose ranker has another vocabulary (ours, trained on ImageNet classes) still loads.
UNUSED_KEYS = ("ranker.prototypes", "ranker.prototype_valid")
PART_TARGETS_SUFFIX = "_part_targets"


def part_target_dicts(dicts):
    """``*_parts`` dicts -> dicts whose annotations are the parts (PartTargetLSJMapper's input).

    Each part keeps its segmentation and id; ``category_id`` becomes the part category and the owner
    is kept as ``object_id`` / ``object_category_id``, and the owners as ``objects`` (object-centric
    crops need them). Parts of crowd objects are left out.
    """
    out = []
    for d in dicts:
        parts, objects = [], []
        for j, obj in enumerate(d.get("annotations", ())):
            if obj.get("iscrowd", 0) or not obj.get("parts"):
                continue
            # Annotation ids may be absent: the row index then identifies the owner within the image.
            oid = obj.get("id", j)
            objects.append({"id": oid, "category_id": int(obj["category_id"]), "segmentation": obj["segmentation"],
                            "iscrowd": 0})
            for p in obj["parts"]:
                parts.append({"segmentation": p["segmentation"], PART_CATEGORY_KEY: int(p["category_id"]),
                              "id": p.get("id"), "iscrowd": 0, "object_id": oid,
                              "object_category_id": int(obj["category_id"])})
        out.append({**{k: v for k, v in d.items() if k != "annotations"}, "annotations": parts, "objects": objects})
    return out


def dataset_part_classes(name):
    """``part_classes`` of a registered ``*_parts`` dataset (a ValueError names what is missing)."""
    meta = MetadataCatalog.get(name)
    classes = meta.get("part_classes")
    if not classes:
        raise ValueError(f"stage 'supervised' needs *_parts datasets (docs/formats.md) with metadata "
                         f"part_classes; {name!r} has none")
    return list(classes)


def register_part_targets(name):
    """Register ``<name>_part_targets``, the part-target view of ``*_parts`` dataset ``name``."""
    if name not in DatasetCatalog.list():
        raise KeyError(f"stage 'supervised': dataset {name!r} is not registered")
    dataset_part_classes(name)
    new = name + PART_TARGETS_SUFFIX

    def load():
        dicts = DatasetCatalog.get(name)
        if not any("parts" in a for d in dicts for a in d.get("annotations", ())):
            raise ValueError(f"dataset {name!r} has no 'parts' in its annotations: the supervised stage "
                             "trains on a *_parts dataset (docs/formats.md)")
        targets = part_target_dicts(dicts)
        logger.info("%s: %d images, %d part targets from %s", new, len(targets),
                    sum(len(d["annotations"]) for d in targets), name)
        return targets

    DatasetCatalog.pop(new, None)
    MetadataCatalog.pop(new, None)
    DatasetCatalog.register(new, load)
    meta = MetadataCatalog.get(name).as_dict()
    meta.pop("name", None)
    meta.pop("evaluator_type", None)  # a training view: the part evaluators need the nested form
    # The targets' category_id is a part category: detectron2's class histogram reads thing_classes.
    meta["object_classes"] = meta.pop("thing_classes", [])
    MetadataCatalog.get(new).set(**meta, thing_classes=dataset_part_classes(name), part_targets_of=name)
    return new


def _check_config(cfg, train_names):
    if cfg.MODEL.META_ARCHITECTURE != SUPERVISED_META_ARCH:
        raise ValueError(f"stage 'supervised' trains a part-category head: MODEL.META_ARCHITECTURE must be "
                         f"{SUPERVISED_META_ARCH!r}, got {cfg.MODEL.META_ARCHITECTURE!r}")
    if cfg.INPUT.DATASET_MAPPER_NAME != PART_MAPPER:
        raise ValueError(f"stage 'supervised' trains on part targets: INPUT.DATASET_MAPPER_NAME must be "
                         f"{PART_MAPPER!r}, got {cfg.INPUT.DATASET_MAPPER_NAME!r}")
    if cfg.INPUT.PART_CLASS_KEY != PART_CATEGORY_KEY:
        raise ValueError(f"stage 'supervised' labels each part with its category: set INPUT.PART_CLASS_KEY "
                         f"{PART_CATEGORY_KEY!r}, got {cfg.INPUT.PART_CLASS_KEY!r}")
    if not train_names:
        raise ValueError("stage 'supervised' needs DATASETS.TRAIN: one or more *_parts datasets")
    classes = dataset_part_classes(train_names[0])
    for name in list(train_names[1:]) + list(cfg.DATASETS.TEST):
        if dataset_part_classes(name) != classes:
            raise ValueError(f"stage 'supervised': dataset {name!r} has other part_classes than "
                             f"{train_names[0]!r}; predicted categories would not mean the same parts")
    n = cfg.MODEL.PART_DISTILL.NUM_PART_CLASSES
    if n != len(classes):
        raise ValueError(f"stage 'supervised': MODEL.PART_DISTILL.NUM_PART_CLASSES must equal the number of "
                         f"part categories of {train_names[0]!r} ({len(classes)}), got {n}")
    if cfg.DATASETS.TEST and cfg.TEST.PARTS.ASSOCIATION != "identity":
        logger.warning("stage 'supervised' with TEST.PARTS.ASSOCIATION=%r: predicted categories are matched "
                       "to GT parts as clusters would be; 'identity' compares them directly",
                       cfg.TEST.PARTS.ASSOCIATION)
    return classes


def check_initialisation(incompatible, weights):
    """Summarise (and log) how the model was initialised from ``weights``.

    Returns {"reinitialised": keys whose shape differed (class head), "fresh": keys missing from the
    checkpoint}. A shape mismatch outside REINITIALISED_KEYS raises: it means another architecture.
    """
    if incompatible is None:
        return {"reinitialised": [], "fresh": []}
    shapes = {k: (tuple(a), tuple(b)) for k, a, b in incompatible.incorrect_shapes}
    other = sorted(set(shapes) - set(REINITIALISED_KEYS) - set(UNUSED_KEYS))
    if other:
        raise ValueError(f"MODEL.WEIGHTS {weights} does not fit the supervised model: shape mismatch of "
                         f"{other[:5]}{' ...' if len(other) > 5 else ''} (checkpoint vs model: "
                         f"{[shapes[k] for k in other[:5]]}); only the part class head may differ")
    reinit = sorted(set(shapes) - set(UNUSED_KEYS))
    # fvcore also lists the re-initialised keys as missing (it dropped them before loading).
    fresh = sorted(set(incompatible.missing_keys) - set(shapes))
    if reinit:
        logger.info("Loaded %s; re-initialised the part classification layer (NUM_PART_CLASSES differs): %s",
                    weights, ", ".join(f"{k} {shapes[k][0]} -> {shapes[k][1]}" for k in reinit))
    if fresh:
        prefixes = sorted({k.split(".")[0] for k in fresh})
        logger.info("Loaded %s; %d keys missing from it start fresh (modules: %s)", weights, len(fresh),
                    ", ".join(prefixes))
    return {"reinitialised": reinit, "fresh": fresh}


def run_supervised(cfg, resume=True):
    """Fine-tune on the part labels of DATASETS.TRAIN; returns the evaluation on DATASETS.TEST.

    The result also holds ``supervised``: weights, re-initialised keys, number of fresh keys,
    training datasets and their image count.
    """
    # Idempotent: a cfg from build_cfg is already cut, a hand-made one gets its FEW_SHOT subset here.
    train_names = few_shot_train_datasets(cfg)
    _check_config(cfg, train_names)
    targets = tuple(register_part_targets(n) for n in train_names)
    cfg = with_overrides(cfg, **{"DATASETS.TRAIN": targets})
    trainer = PartDistillTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    resumed = trainer.checkpointer.resumed_from is not None
    init = {"reinitialised": [], "fresh": []}
    if not resumed:
        init = check_initialisation(trainer.checkpointer.last_incompatible, cfg.MODEL.WEIGHTS)
    if trainer.start_iter < trainer.max_iter:
        trainer.train()
    res = getattr(trainer, "_last_eval_results", None) or evaluate_stage(cfg, trainer.model)
    info = {"weights": cfg.MODEL.WEIGHTS, "resumed": bool(resumed), "reinitialised": init["reinitialised"],
            "num_fresh_keys": len(init["fresh"]), "train_datasets": list(train_names),
            "train_images": sum(len(DatasetCatalog.get(n)) for n in train_names),
            "percent": float(cfg.DATASETS.FEW_SHOT.PERCENT), "iterations": int(cfg.SOLVER.MAX_ITER)}
    if comm.is_main_process():
        logger.info("Stage supervised: %s", info)
    return dict(res or {}, supervised=info)
