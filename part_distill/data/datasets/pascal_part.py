"""Pascal-Part (Chen et al., 2014): VOC2010 images + one ``.mat`` of object and part masks per image.

Each ``.mat`` holds ``anno[0, 0]['objects'][0]``, a list of objects with fields ``class`` (VOC
name), ``class_ind`` (1..20), ``mask`` (HxW uint8) and ``parts`` (a 1xN struct array with
``part_name`` and ``mask``; 0x0 for classes without parts). Parts of one object may overlap
(a person's ``head`` contains its ``leye``).

Part vocabularies (part class names are object-specific, ``<object>_<part>``):

* **fine**: Pascal-Part's own names with the instance number of repeated parts stripped
  (``wheel_1``, ``wheel_2`` -> ``wheel``; each numbered part stays a separate annotation), 195
  classes (``FINE_PARTS``).
* **coarse**: left/right/front/back/upper/lower variants and face sub-parts merged, one union mask
  per (object, coarse part), 73 classes (``COARSE_PARTS``). Person follows Pascal-Person-Part
  (head, torso, upper/lower arm, upper/lower leg; hands and feet join the lower limbs).
"""
import logging
import os
import re
from functools import lru_cache

import numpy as np
import scipy.io
from PIL import Image

from ..image_io import SkipCounter
from .real_common import assign_ids, map_images, object_record, part_record

__all__ = [
    "VOC_CLASSES", "FINE_PARTS", "COARSE_PARTS", "pascal_part_vocabulary", "base_part_name",
    "read_pascal_part_mat", "load_pascal_part", "read_split_ids",
]

logger = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

_VEHICLE = ("frontside", "leftside", "rightside", "backside", "roofside", "leftmirror", "rightmirror",
            "fliplate", "bliplate", "door", "wheel", "headlight", "window")
_CAT = ("head", "leye", "reye", "lear", "rear", "nose", "torso", "neck",
        "lfleg", "lfpa", "rfleg", "rfpa", "lbleg", "lbpa", "rbleg", "rbpa", "tail")
_COW = ("head", "leye", "reye", "lear", "rear", "muzzle", "lhorn", "rhorn", "torso", "neck",
        "lfuleg", "lflleg", "rfuleg", "rflleg", "lbuleg", "lblleg", "rbuleg", "rblleg", "tail")
_HOOVES = ("lfho", "rfho", "lbho", "rbho")

# Fine part names per class, as they appear in the .mat files (numbered parts without "_<n>").
FINE_PARTS = {
    "aeroplane": ("body", "stern", "lwing", "rwing", "tail", "engine", "wheel"),
    "bicycle": ("fwheel", "bwheel", "saddle", "handlebar", "chainwheel", "headlight"),
    "bird": ("head", "leye", "reye", "beak", "torso", "neck", "lwing", "rwing",
             "lleg", "lfoot", "rleg", "rfoot", "tail"),
    "boat": (),
    "bottle": ("cap", "body"),
    "bus": _VEHICLE,
    "car": _VEHICLE,
    "cat": _CAT,
    "chair": (),
    "cow": _COW,
    "diningtable": (),
    "dog": _CAT + ("muzzle",),
    "horse": _COW + _HOOVES,
    "motorbike": ("fwheel", "bwheel", "handlebar", "saddle", "headlight"),
    "person": ("head", "leye", "reye", "lear", "rear", "lebrow", "rebrow", "nose", "mouth", "hair",
               "torso", "neck", "llarm", "luarm", "lhand", "rlarm", "ruarm", "rhand",
               "llleg", "luleg", "lfoot", "rlleg", "ruleg", "rfoot"),
    "pottedplant": ("pot", "plant"),
    "sheep": _COW,
    "sofa": (),
    "train": ("head", "hfrontside", "hleftside", "hrightside", "hbackside", "hroofside", "headlight",
              "coach", "cfrontside", "cleftside", "crightside", "cbackside", "croofside"),
    "tvmonitor": ("screen",),
}

_VEHICLE_COARSE = {
    "body": ("frontside", "leftside", "rightside", "backside", "roofside"),
    "mirror": ("leftmirror", "rightmirror"),
    "license_plate": ("fliplate", "bliplate"),
    "door": ("door",), "wheel": ("wheel",), "headlight": ("headlight",), "window": ("window",),
}
_CAT_LEGS = ("lfleg", "lfpa", "rfleg", "rfpa", "lbleg", "lbpa", "rbleg", "rbpa")
_COW_HEAD = ("head", "leye", "reye", "lear", "rear", "muzzle", "lhorn", "rhorn")
_COW_LEGS = ("lfuleg", "lflleg", "rfuleg", "rflleg", "lbuleg", "lblleg", "rbuleg", "rblleg")

# Coarse part -> the fine parts whose union it is, per class. Every fine part maps to exactly one.
COARSE_PARTS = {
    "aeroplane": {"body": ("body",), "tail": ("stern", "tail"), "wing": ("lwing", "rwing"),
                  "engine": ("engine",), "wheel": ("wheel",)},
    "bicycle": {"wheel": ("fwheel", "bwheel"), "saddle": ("saddle",), "handlebar": ("handlebar",),
                "chainwheel": ("chainwheel",), "headlight": ("headlight",)},
    "bird": {"head": ("head", "leye", "reye", "beak"), "neck": ("neck",), "torso": ("torso",),
             "wing": ("lwing", "rwing"), "leg": ("lleg", "lfoot", "rleg", "rfoot"), "tail": ("tail",)},
    "boat": {},
    "bottle": {"cap": ("cap",), "body": ("body",)},
    "bus": _VEHICLE_COARSE,
    "car": _VEHICLE_COARSE,
    "cat": {"head": ("head", "leye", "reye", "lear", "rear", "nose"), "neck": ("neck",), "torso": ("torso",),
            "leg": _CAT_LEGS, "tail": ("tail",)},
    "chair": {},
    "cow": {"head": _COW_HEAD, "neck": ("neck",), "torso": ("torso",), "leg": _COW_LEGS, "tail": ("tail",)},
    "diningtable": {},
    "dog": {"head": ("head", "leye", "reye", "lear", "rear", "nose", "muzzle"), "neck": ("neck",),
            "torso": ("torso",), "leg": _CAT_LEGS, "tail": ("tail",)},
    "horse": {"head": _COW_HEAD, "neck": ("neck",), "torso": ("torso",), "leg": _COW_LEGS + _HOOVES,
              "tail": ("tail",)},
    "motorbike": {"wheel": ("fwheel", "bwheel"), "handlebar": ("handlebar",), "saddle": ("saddle",),
                  "headlight": ("headlight",)},
    "person": {"head": ("head", "leye", "reye", "lear", "rear", "lebrow", "rebrow", "nose", "mouth", "hair"),
               "torso": ("torso", "neck"), "upper_arm": ("luarm", "ruarm"),
               "lower_arm": ("llarm", "rlarm", "lhand", "rhand"), "upper_leg": ("luleg", "ruleg"),
               "lower_leg": ("llleg", "rlleg", "lfoot", "rfoot")},
    "pottedplant": {"pot": ("pot",), "plant": ("plant",)},
    "sheep": {"head": _COW_HEAD, "neck": ("neck",), "torso": ("torso",), "leg": _COW_LEGS, "tail": ("tail",)},
    "sofa": {},
    "train": {"locomotive": ("head", "hfrontside", "hleftside", "hrightside", "hbackside", "hroofside"),
              "coach": ("coach", "cfrontside", "cleftside", "crightside", "cbackside", "croofside"),
              "headlight": ("headlight",)},
    "tvmonitor": {"screen": ("screen",)},
}

_NUMBERED = re.compile(r"^(.*?)_(\d+)$")


def base_part_name(name):
    """``wheel_2`` -> ``wheel``: the number only tells repeated parts of one object apart."""
    m = _NUMBERED.match(name)
    return m.group(1) if m else name


@lru_cache(maxsize=None)
def pascal_part_vocabulary(level):
    """``(part_classes, object_part_classes, fine_to_part_id)`` for ``level`` "fine" or "coarse".

    ``fine_to_part_id[(object class, fine base name)]`` is the contiguous part class id.
    """
    if level not in ("fine", "coarse"):
        raise ValueError(f"Pascal-Part part level must be 'fine' or 'coarse', got {level!r}")
    part_classes, object_part_classes, fine_to_id = [], {}, {}
    for c, cls in enumerate(VOC_CLASSES):
        groups = ({p: (p,) for p in FINE_PARTS[cls]} if level == "fine" else COARSE_PARTS[cls])
        object_part_classes[c] = []
        for part, fines in groups.items():
            object_part_classes[c].append(len(part_classes))
            for f in fines:
                fine_to_id[(cls, f)] = len(part_classes)
            part_classes.append(f"{cls}_{part}")
    return part_classes, object_part_classes, fine_to_id


def _str_field(value):
    return str(np.asarray(value).ravel()[0])


def read_pascal_part_mat(path):
    """Objects of one annotation file: ``[(class name, class_ind, mask, [(part name, mask), ...]), ...]``.

    Masks are HxW bool arrays, part names as stored (``wheel_1``).
    """
    anno = scipy.io.loadmat(path)["anno"][0, 0]
    objects = []
    for obj in anno["objects"].ravel():
        parts = obj["parts"]
        part_list = [(_str_field(p["part_name"]), np.asarray(p["mask"]).astype(bool))
                     for p in (parts.ravel() if parts.size else [])]
        objects.append((_str_field(obj["class"]), int(np.asarray(obj["class_ind"]).ravel()[0]),
                        np.asarray(obj["mask"]).astype(bool), part_list))
    return objects


def _image_id(name):
    """``2008_000008`` -> 2008000008 (ints keep evaluators and JSON writers simple)."""
    digits = name.replace("_", "")
    return int(digits) if digits.isdigit() else name


def read_split_ids(split_file):
    """Image names of a VOC split list (one name per line, optional trailing columns ignored)."""
    with open(split_file) as f:
        return [line.split()[0] for line in f if line.strip()]


def load_pascal_part(image_dir, anno_dir, image_names, parts=None, dataset_name=None, num_workers=None):
    """detectron2 dicts for ``image_names`` (``2008_000008``...).

    Args:
        image_dir: folder of ``<name>.jpg`` (VOC2010 JPEGImages).
        anno_dir: folder of ``<name>.mat`` (Pascal-Part Annotations_Part).
        parts: None (objects only), "fine" or "coarse": attach each object's ``parts``.
        num_workers: processes decoding .mat files (None: automatic, 0: in this process).

    Objects or parts with empty masks, unknown part names, part pixels outside their object and
    images without an annotation file are dropped (or clipped) and counted in one warning.
    """
    if parts is not None:
        pascal_part_vocabulary(parts)  # fail on a bad level before any work
    jobs = [(image_dir, anno_dir, name, parts) for name in image_names]
    skips = SkipCounter(f"Pascal-Part {dataset_name or anno_dir}")
    dicts = []
    for record, image_skips in map_images(_load_image, jobs, num_workers):
        skips.merge(image_skips)
        if record is not None:
            dicts.append(record)
    skips.warn_summary(logger)
    return assign_ids(dicts)


def _load_image(job):
    """One image's record (ids filled in later by ``assign_ids``) and its skip counts."""
    image_dir, anno_dir, name, level = job
    skips = SkipCounter(name)
    mat = os.path.join(anno_dir, name + ".mat")
    if not os.path.isfile(mat):
        skips.skip("image_without_annotation_file", mat)
        return None, skips
    fine_to_id = pascal_part_vocabulary(level)[2] if level else {}
    objects = read_pascal_part_mat(mat)
    file_name = os.path.join(image_dir, name + ".jpg")
    if objects:
        height, width = objects[0][2].shape
    else:  # no objects: the size must come from the image header
        with Image.open(file_name) as im:
            width, height = im.size
    annotations = []
    for cls, class_ind, mask, part_list in objects:
        if not 1 <= class_ind <= len(VOC_CLASSES) or VOC_CLASSES[class_ind - 1] != cls:
            skips.skip("object_with_bad_class", f"{name}: {cls!r}/{class_ind}")
            continue
        if not mask.any():
            skips.skip("object_with_empty_mask", name)
            continue
        ann = object_record(mask, class_ind - 1, 0)
        if level:
            ann["parts"] = _object_parts(cls, mask, part_list, level, fine_to_id, skips, name)
        annotations.append(ann)
    return {"file_name": file_name, "height": int(height), "width": int(width),
            "image_id": _image_id(name), "annotations": annotations}, skips


def _object_parts(cls, obj_mask, part_list, level, fine_to_id, skips, name):
    """Part annotations of one object: fine = one per stored part, coarse = one union per group."""
    masks = {}  # (part class, stored name) -> mask; coarse merges on part class alone
    for pname, pmask in part_list:
        pid = fine_to_id.get((cls, base_part_name(pname)))
        if pid is None:
            skips.skip("unknown_part_name", f"{name}: {cls}/{pname}")
            continue
        if not pmask.any():
            skips.skip("part_with_empty_mask", f"{name}: {cls}/{pname}")
            continue
        if (pmask & ~obj_mask).any():
            skips.skip("part_clipped_to_object", f"{name}: {cls}/{pname}")
            pmask = pmask & obj_mask
            if not pmask.any():
                continue
        key = (pid, pname if level == "fine" else None)
        masks[key] = masks[key] | pmask if key in masks else pmask
    return [part_record(m, pid, 0) for (pid, _), m in masks.items()]
