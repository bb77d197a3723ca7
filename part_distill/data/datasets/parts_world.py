"""Registers the synthetic parts world in detectron2's catalogs.

``parts_world_{train,val}``: instance datasets (standard detectron2 dicts, docs/formats.md).
``parts_world_{train,val}_parts``: the same dicts with each object's ``parts`` attached; only the
evaluators and the few-shot ``supervised`` stage may read them.

The registered world lives at ``$DETECTRON2_DATASETS/parts_world/<settings key>/`` (default
``./datasets/parts_world/<key>``), resolved when a dataset is first requested, and is generated
there once (atomically) if missing. Other settings are another folder: the names always mean the
world of the registered settings, and no world is ever rewritten under a store made from it.
"""
import json
import os
from collections import defaultdict

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from ..parts_world import OBJECT_CLASSES, OBJECT_PARTS, PART_CLASSES, WorldSettings, ensure_parts_world, world_dir

# dataset name -> (split, with parts)
PARTS_WORLD_DATASETS = {
    "parts_world_train": ("train", False),
    "parts_world_val": ("val", False),
    "parts_world_train_parts": ("train", True),
    "parts_world_val_parts": ("val", True),
}


def parts_world_root(subdir="parts_world"):
    """The folder of all worlds: ``subdir`` under $DETECTRON2_DATASETS (an absolute subdir wins)."""
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), subdir)


def parts_world_dir(settings=None, subdir="parts_world"):
    """The folder of one world, ``<parts_world_root(subdir)>/<settings.key>`` (default settings)."""
    return world_dir(parts_world_root(subdir), settings or WorldSettings())


def parts_world_metadata():
    """Class names shared by every parts-world dataset."""
    return {
        "thing_classes": list(OBJECT_CLASSES),
        "part_classes": list(PART_CLASSES),
        "object_part_classes": {
            i: [PART_CLASSES.index(p) for p in OBJECT_PARTS[c]] for i, c in enumerate(OBJECT_CLASSES)
        },
    }


def load_parts_world(root, split, with_parts=False, dataset_name=None):
    """detectron2 dicts of one split of the world at ``root`` (which must exist)."""
    image_root = os.path.join(root, "images", split)
    dicts = load_coco_json(os.path.join(root, f"instances_{split}.json"), image_root,
                           dataset_name, extra_annotation_keys=["id"])
    if dataset_name is None:  # load_coco_json maps category ids only when given a name
        for d in dicts:
            for a in d["annotations"]:
                a["category_id"] -= 1
    if not with_parts:
        return dicts
    with open(os.path.join(root, f"parts_{split}.json")) as f:
        part_json = json.load(f)
    to_contiguous = {c["id"]: PART_CLASSES.index(c["name"]) for c in part_json["categories"]}
    by_object = defaultdict(list)
    for p in part_json["annotations"]:
        by_object[p["object_id"]].append(
            {"category_id": to_contiguous[p["category_id"]], "segmentation": p["segmentation"], "id": p["id"]})
    for d in dicts:
        for a in d["annotations"]:
            a["parts"] = by_object.get(a["id"], [])
    return dicts


def _publish_metadata(name, **fields):
    """Set metadata fields, replacing entries whose value changed (detectron2 forbids overwrite)."""
    meta = MetadataCatalog.get(name)
    if any(getattr(meta, k, v) != v for k, v in fields.items()):
        old = meta.as_dict()
        old.pop("name", None)
        MetadataCatalog.pop(name, None)
        meta = MetadataCatalog.get(name)
        meta.set(**{**old, **fields})
    else:
        meta.set(**fields)


def _load(name, settings, subdir):
    split, with_parts = PARTS_WORLD_DATASETS[name]
    root = ensure_parts_world(parts_world_root(subdir), settings)
    _publish_metadata(name, json_file=os.path.join(root, f"instances_{split}.json"),
                      image_root=os.path.join(root, "images", split), dataset_root=root)
    return load_parts_world(root, split, with_parts, dataset_name=name)


def register_parts_world(settings=None, subdir="parts_world"):
    """(Re-)register the four parts-world datasets for ``settings`` (default: WorldSettings()).

    The world's folder, ``<settings.key>`` inside ``subdir`` under $DETECTRON2_DATASETS (or inside
    ``subdir`` itself if absolute), is resolved each time a dataset is loaded, so the variable may
    be set after import. Metadata ``world_settings`` / ``world_key`` / ``world_split`` say which
    world a name stands for (its fingerprint, part_distill/data/fingerprint.py).
    """
    settings = settings or WorldSettings()
    for name, (split, with_parts) in PARTS_WORLD_DATASETS.items():
        DatasetCatalog.pop(name, None)
        MetadataCatalog.pop(name, None)
        DatasetCatalog.register(name, lambda name=name: _load(name, settings, subdir))
        MetadataCatalog.get(name).set(
            evaluator_type="parts" if with_parts else "coco", world_settings=settings.as_dict(),
            world_key=settings.key, world_split=split, **parts_world_metadata())


def register_parts_world_from_config(cfg):
    """Re-register with ``cfg.PARTS_WORLD`` (seed, sizes, root), e.g. from a trainer's setup()."""
    register_parts_world(WorldSettings.from_config(cfg), cfg.PARTS_WORLD.ROOT)


register_parts_world()
