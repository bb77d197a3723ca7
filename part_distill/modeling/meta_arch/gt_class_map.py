"""GT objects of a dataset whose vocabulary is not the model's (zero-shot evaluation, paper Table 3).

A stage-4 head and the ranker index their slots / prototypes by the class of the *model's* vocabulary
(the objects it trained on: Detic's classes for the ImageNet collection). A target dataset's GT
``category_id`` is an index into *its own* ``thing_classes`` (Pascal-Part's 20 VOC classes, ...), so
with ``MODEL.PART_DISTILL.OBJECTS "gt"`` it must be translated first. ``MODEL.PART_DISTILL.TEST.GT_CLASS_MAP``:

* ``""``: the dataset's ids are the model's (the model was trained on that vocabulary);
* ``"names"``: a dataset class takes the model class of the same name (case and ``_``/space ignored);
* a JSON file ``{"dataset class": "model class", ...}``: those first, the other names as ``"names"``.

Dataset classes left without a model class map to -1: their parts keep their masks and owner but no
cluster (the evaluators count them as unclustered), and the load logs them.
"""
import json
import logging

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["build_gt_class_lookup", "class_lookup"]

logger = logging.getLogger(__name__)


def _key(name):
    return str(name).strip().lower().replace("_", " ")


def _thing_classes(names, what):
    found = None
    for name in names:
        if name not in DatasetCatalog.list():
            raise ValueError(f"MODEL.PART_DISTILL.TEST.GT_CLASS_MAP: {what} dataset {name!r} is not registered")
        meta = MetadataCatalog.get(name)
        if not hasattr(meta, "thing_classes"):
            DatasetCatalog.get(name)  # loaders that set the vocabulary when they run
        classes = list(getattr(meta, "thing_classes", None) or [])
        if not classes:
            raise ValueError(f"MODEL.PART_DISTILL.TEST.GT_CLASS_MAP: {what} dataset {name!r} has no thing_classes")
        if found is not None and classes != found:
            raise ValueError(f"MODEL.PART_DISTILL.TEST.GT_CLASS_MAP: the {what} datasets {list(names)} have "
                             "different thing_classes")
        found = classes
    return found


def class_lookup(dataset_classes, model_classes, explicit=None):
    """LongTensor[len(dataset_classes)]: the model class index of each dataset class, -1 where none."""
    explicit = dict(explicit or {})
    unknown = sorted(set(explicit) - set(dataset_classes))
    if unknown:
        raise ValueError(f"GT_CLASS_MAP names dataset classes {unknown[:5]} that the dataset does not have")
    by_name = {}
    for i, name in enumerate(model_classes):
        by_name.setdefault(_key(name), i)
    lookup = []
    for name in dataset_classes:
        target = explicit.get(name, name)
        if target not in model_classes and _key(target) not in by_name and name in explicit:
            raise ValueError(f"GT_CLASS_MAP maps {name!r} to {target!r}, which is not a class of the model")
        lookup.append(by_name.get(_key(target), -1))
    return torch.tensor(lookup, dtype=torch.int64)


def build_gt_class_lookup(cfg):
    """The lookup of ``cfg``'s GT_CLASS_MAP for DATASETS.TEST (None: ids are kept as they are)."""
    mode = cfg.MODEL.PART_DISTILL.TEST.GT_CLASS_MAP
    if not mode or cfg.MODEL.PART_DISTILL.OBJECTS != "gt" or not cfg.DATASETS.TEST:
        return None
    explicit = {}
    if mode != "names":
        try:
            with open(mode) as f:
                explicit = json.load(f)
        except OSError as e:
            raise FileNotFoundError(f"MODEL.PART_DISTILL.TEST.GT_CLASS_MAP {mode!r}: {e}") from e
        if not isinstance(explicit, dict):
            raise ValueError(f"MODEL.PART_DISTILL.TEST.GT_CLASS_MAP {mode!r} must hold a JSON object "
                             "{dataset class: model class}")
    # The model's vocabulary: the objects its part stages trained on (as engine/class_counts.py).
    model_names = cfg.PART_DISTILL.SELF_TRAIN.DATASETS or cfg.DATASETS.TRAIN
    model_classes = _thing_classes(model_names, "model vocabulary")
    dataset_classes = _thing_classes(cfg.DATASETS.TEST, "test")
    lookup = class_lookup(dataset_classes, model_classes, explicit)
    missing = [c for c, i in zip(dataset_classes, lookup.tolist()) if i < 0]
    logger.info("GT objects of %s: %d of %d classes mapped to the model's vocabulary (%s)%s",
                ", ".join(cfg.DATASETS.TEST), len(dataset_classes) - len(missing), len(dataset_classes),
                ", ".join(model_names), f"; without a model class (no cluster ids): {missing}" if missing else "")
    return lookup
