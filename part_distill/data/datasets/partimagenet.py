"""PartImageNet (He et al., 2022): COCO-format part annotations on ImageNet images.

One json per split (``annotations/<split>/<split>.json``): ``categories`` are the 40 parts, each
with ``supercategory`` one of 11 object supercategories (``{"id": 0, "name": "Quadruped Head",
"supercategory": "Quadruped"}``); ``annotations`` are part polygons; ``images`` are ImageNet
files named ``<wnid>_<n>.JPEG``.

PartImageNet has no object annotations. An object here is the union of the parts of one
supercategory in one image (PartImageNet images show one annotated object), and its class is
that supercategory; the image's synset (``wnid``) is kept in each record as ``synset``.
"""
import json
import logging
import os
from collections import defaultdict

import numpy as np

from ...utils.masks import decode_rle, polygons_to_mask
from ..image_io import SkipCounter
from .real_common import object_record, part_record, require_path

__all__ = ["PARTIMAGENET_OBJECTS", "PARTIMAGENET_PARTS", "partimagenet_vocabulary", "load_partimagenet"]

logger = logging.getLogger(__name__)

# The released vocabulary, in category-id order (0..39); used as metadata before any json is read.
_PARTS_BY_OBJECT = (
    ("Quadruped", ("Head", "Body", "Foot", "Tail")),
    ("Biped", ("Head", "Body", "Hand", "Foot", "Tail")),
    ("Fish", ("Head", "Body", "Fin", "Tail")),
    ("Bird", ("Head", "Body", "Wing", "Foot", "Tail")),
    ("Snake", ("Head", "Body")),
    ("Reptile", ("Head", "Body", "Foot", "Tail")),
    ("Car", ("Body", "Tier", "Side Mirror")),
    ("Bicycle", ("Body", "Head", "Seat", "Tier")),
    ("Boat", ("Body", "Sail")),
    ("Aeroplane", ("Head", "Body", "Engine", "Wing", "Tail")),
    ("Bottle", ("Mouth", "Body")),
)
PARTIMAGENET_OBJECTS = tuple(o for o, _ in _PARTS_BY_OBJECT)
PARTIMAGENET_PARTS = tuple(f"{o} {p}" for o, parts in _PARTS_BY_OBJECT for p in parts)


def partimagenet_vocabulary(categories=None):
    """``(thing_classes, part_classes, object_part_classes, part_to_object)`` from json categories.

    Objects are the supercategories in order of first appearance by category id, parts the
    categories by id; without ``categories`` the released vocabulary is returned.
    """
    if categories is None:
        categories = [{"id": i, "name": n, "supercategory": n.split(" ")[0]} for i, n in enumerate(PARTIMAGENET_PARTS)]
    things, parts, object_parts, part_to_object = [], [], defaultdict(list), []
    for cat in sorted(categories, key=lambda c: c["id"]):
        if cat["supercategory"] not in things:
            things.append(cat["supercategory"])
        obj = things.index(cat["supercategory"])
        object_parts[obj].append(len(parts))
        part_to_object.append(obj)
        parts.append(cat["name"])
    return things, parts, dict(object_parts), part_to_object


def _image_path(image_root, file_name):
    """Flat ``images/<split>/<file>`` (the release) or ImageNet-style ``<wnid>/<file>`` folders."""
    flat = os.path.join(image_root, file_name)
    if os.path.exists(flat):
        return flat
    nested = os.path.join(image_root, file_name.split("_")[0], os.path.basename(file_name))
    return nested if os.path.exists(nested) else flat


def _part_mask(segmentation, height, width):
    if isinstance(segmentation, dict):
        return decode_rle(segmentation)
    polygons = [p for p in segmentation if len(p) >= 6]  # fewer than 3 points encloses nothing
    return polygons_to_mask(polygons, height, width) if polygons else np.zeros((height, width), bool)


def load_partimagenet(json_file, image_root, with_parts=False, dataset_name=None):
    """detectron2 dicts of one PartImageNet split (docs/formats.md).

    Part annotations with empty masks (PartImageNet has polygon-less ones) are dropped and
    counted; an object is only made from the remaining parts. Returns
    ``(dicts, vocabulary)`` where vocabulary is ``partimagenet_vocabulary(json categories)``.
    """
    require_path(json_file, "PartImageNet annotation json")
    require_path(image_root, "PartImageNet image folder")
    with open(json_file) as f:
        data = json.load(f)
    vocab = partimagenet_vocabulary(data["categories"])
    things, part_classes, _, part_to_object = vocab
    cat_to_part = {c["id"]: part_classes.index(c["name"]) for c in data["categories"]}
    skips = SkipCounter(f"PartImageNet {dataset_name or json_file}")

    by_image = defaultdict(list)
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann)
    dicts, next_object_id = [], 1
    for img in data["images"]:
        h, w = int(img["height"]), int(img["width"])
        groups = defaultdict(list)  # object class -> [(part class, mask, annotation id)]
        for ann in by_image.get(img["id"], ()):
            if ann["category_id"] not in cat_to_part:
                skips.skip("part_with_unknown_category", ann["category_id"])
                continue
            mask = _part_mask(ann.get("segmentation") or [], h, w)
            if not mask.any():
                skips.skip("part_with_empty_mask", f"annotation {ann['id']} of {img['file_name']}")
                continue
            part = cat_to_part[ann["category_id"]]
            groups[part_to_object[part]].append((part, mask, ann["id"]))
        annotations = []
        for obj_class in sorted(groups):
            members = groups[obj_class]
            record = object_record(np.logical_or.reduce([m for _, m, _ in members]), obj_class, next_object_id)
            next_object_id += 1
            if with_parts:
                record["parts"] = [part_record(m, p, i) for p, m, i in members]
            annotations.append(record)
        file_name = img["file_name"]
        dicts.append({"file_name": _image_path(image_root, file_name), "height": h, "width": w,
                      "image_id": img["id"], "synset": os.path.basename(file_name).split("_")[0],
                      "annotations": annotations})
    skips.warn_summary(logger)
    if dicts and not os.path.exists(dicts[0]["file_name"]):
        require_path(dicts[0]["file_name"], "PartImageNet image",
                     hint=f"Images are looked up as {image_root}/<file_name> or {image_root}/<wnid>/<file_name>.")
    return dicts, vocab
