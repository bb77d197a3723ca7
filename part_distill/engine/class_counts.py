"""Class counts filled from dataset metadata: a config sets a count to -1 and :func:`resolve_class_counts`
(called by ``build_cfg``) replaces it, so no YAML hard-codes the size of a vocabulary (docs/configs.md).

* ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` -1: ``len(thing_classes)`` of ``DATASETS.TRAIN``.
* ``MODEL.PART_DISTILL.NUM_OBJECT_CLASSES`` -1: ``len(thing_classes)`` of the datasets whose objects own
  the parts (``PART_DISTILL.SELF_TRAIN.DATASETS`` for the part stages, ``DATASETS.TRAIN`` otherwise).
* ``MODEL.PART_DISTILL.NUM_PART_CLASSES`` -1: ``len(part_classes)`` of ``DATASETS.TRAIN`` (stage
  ``supervised``), object classes x ``CLUSTERS_PER_CLASS`` (``distill`` / ``one_stage``), else 1.
"""
from detectron2.data import DatasetCatalog, MetadataCatalog

from ..config import num_object_classes

__all__ = ["resolve_class_counts", "metadata_classes"]

_SLOT_STAGES = ("distill", "one_stage")
_PART_STAGES = ("proposal", "self_train", "ranking", "distill", "one_stage")


def metadata_classes(names, key, what):
    """The ``key`` list (thing_classes / part_classes) shared by datasets ``names`` (loaded if the
    loader is what sets it); a clear error when they lack it or disagree."""
    if not names:
        raise ValueError(f"{what} is -1 (from metadata) but names no dataset")
    found = None
    for name in names:
        if name not in DatasetCatalog.list():
            raise ValueError(f"{what} is -1 (from metadata) but dataset {name!r} is not registered")
        if not hasattr(MetadataCatalog.get(name), key):
            DatasetCatalog.get(name)
        classes = getattr(MetadataCatalog.get(name), key, None)
        if classes is None:
            raise ValueError(f"{what} is -1 (from metadata) but dataset {name!r} has no metadata {key!r}")
        if found is not None and list(classes) != found[1]:
            raise ValueError(f"{what} is -1 (from metadata) but datasets {found[0]!r} and {name!r} "
                             f"have different {key}")
        found = found or (name, list(classes))
    return found[1]


def resolve_class_counts(cfg):
    """Replace the -1 class counts of ``cfg`` (not frozen) in place; returns ``cfg``."""
    pd = cfg.MODEL.PART_DISTILL
    stage = cfg.PART_DISTILL.STAGE
    if cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == -1:
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = len(metadata_classes(
            cfg.DATASETS.TRAIN, "thing_classes", "MODEL.SEM_SEG_HEAD.NUM_CLASSES"))
    if pd.NUM_OBJECT_CLASSES == -1:
        names = cfg.PART_DISTILL.SELF_TRAIN.DATASETS if stage in _PART_STAGES else cfg.DATASETS.TRAIN
        pd.NUM_OBJECT_CLASSES = len(metadata_classes(names, "thing_classes", "MODEL.PART_DISTILL.NUM_OBJECT_CLASSES"))
    if pd.NUM_PART_CLASSES == -1:
        if stage == "supervised":
            pd.NUM_PART_CLASSES = len(metadata_classes(cfg.DATASETS.TRAIN, "part_classes",
                                                       "MODEL.PART_DISTILL.NUM_PART_CLASSES"))
        elif stage in _SLOT_STAGES:
            pd.NUM_PART_CLASSES = num_object_classes(cfg) * pd.CLUSTERS_PER_CLASS
        else:
            pd.NUM_PART_CLASSES = 1
    return cfg
