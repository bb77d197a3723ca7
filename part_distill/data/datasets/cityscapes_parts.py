"""Cityscapes-Panoptic-Parts (Meletis et al., 2020): one ``.tif`` label image per Cityscapes image.

Each pixel holds a uid of up to 7 decimal digits, in one of three forms:

* ``sid``            (uid <= 99): semantic class only (stuff, or a crowd region of a thing class),
* ``sid·iid``        (uid <= 99_999): ``sid * 1000 + iid``, an instance without part label,
* ``sid·iid·pid``    (uid >= 100_000): ``sid * 100_000 + iid * 100 + pid``, e.g. 2400302 =
  person (24), instance 3, part 2 (head).

Instances start at iid 0. Objects are the instances of the 5 classes with parts (Cityscapes
sids 24-28); pid 0 means "unlabeled part" and gives no part annotation. Part classes are shared
between classes of one kind: humans (person, rider) have torso/head/arm/leg (pid 1-4),
vehicles (car, truck, bus) window/wheel/light/license plate/chassis (pid 1-5).
"""
import glob
import logging
import os

import numpy as np
from PIL import Image

from ..image_io import SkipCounter
from .real_common import assign_ids, map_images, object_record, part_record, require_path

__all__ = ["CITYSCAPES_PART_OBJECTS", "CITYSCAPES_PARTS", "cityscapes_parts_vocabulary", "decode_uids",
           "load_cityscapes_parts"]

logger = logging.getLogger(__name__)

# Cityscapes sid -> object class name, for the classes that carry parts.
CITYSCAPES_PART_OBJECTS = {24: "person", 25: "rider", 26: "car", 27: "truck", 28: "bus"}
_HUMAN_PARTS = ("torso", "head", "arm", "leg")
_VEHICLE_PARTS = ("window", "wheel", "light", "license plate", "chassis")
CITYSCAPES_PARTS = _HUMAN_PARTS + _VEHICLE_PARTS
# Object class -> part class id of pid 1, 2, ... (pid p maps to _FIRST_PART[kind] + p - 1).
_FIRST_PART = {"person": 0, "rider": 0, "car": 4, "truck": 4, "bus": 4}
_NUM_PARTS = {"person": 4, "rider": 4, "car": 5, "truck": 5, "bus": 5}

LABEL_SUFFIX = "_gtFinePanopticParts.tif"
IMAGE_SUFFIX = "_leftImg8bit.png"


def cityscapes_parts_vocabulary():
    """``(thing_classes, part_classes, object_part_classes)``."""
    things = list(CITYSCAPES_PART_OBJECTS.values())
    object_parts = {i: list(range(_FIRST_PART[c], _FIRST_PART[c] + _NUM_PARTS[c])) for i, c in enumerate(things)}
    return things, list(CITYSCAPES_PARTS), object_parts


def decode_uids(uids):
    """uid array -> ``(sid, iid, pid)`` int64 arrays; -1 where the uid's form lacks that field."""
    uids = np.asarray(uids, dtype=np.int64)
    if uids.size and (uids.min() < 0 or uids.max() > 9_999_999):
        raise ValueError(f"panoptic-parts uids must lie in [0, 9999999], got [{uids.min()}, {uids.max()}]")
    sid_only, with_pid = uids <= 99, uids >= 100_000
    sid = np.where(sid_only, uids, np.where(with_pid, uids // 100_000, uids // 1000))
    iid = np.where(sid_only, -1, np.where(with_pid, (uids // 100) % 1000, uids % 1000))
    pid = np.where(with_pid, uids % 100, -1)
    return sid, iid, pid


def _load_label_image(job):
    """One label image -> (record with ids filled in later, skip counts)."""
    label_file, image_file, image_id = job
    skips = SkipCounter(image_id)
    with Image.open(label_file) as im:
        uids = np.asarray(im).astype(np.int64)
    if uids.ndim != 2:
        raise ValueError(f"{label_file}: expected a single-channel uid image, got shape {uids.shape}")
    sid, iid, pid = decode_uids(uids)
    obj_key = np.where(np.isin(sid, list(CITYSCAPES_PART_OBJECTS)) & (iid >= 0), sid * 1000 + iid, -1)
    things = list(CITYSCAPES_PART_OBJECTS.values())
    annotations = []
    for key in np.unique(obj_key[obj_key >= 0]):
        mask = obj_key == key
        cls = CITYSCAPES_PART_OBJECTS[int(key) // 1000]
        ann = object_record(mask, things.index(cls), 0)
        parts = []
        for p in np.unique(pid[mask]):
            if p <= 0:  # -1: pixel without part form; 0: "unlabeled" part
                continue
            if p > _NUM_PARTS[cls]:
                skips.skip("unknown_part_id", f"{image_id}: {cls} pid {p}")
                continue
            parts.append(part_record(mask & (pid == p), _FIRST_PART[cls] + p - 1, 0))
        ann["parts"] = parts
        annotations.append(ann)
    return {"file_name": image_file, "height": int(uids.shape[0]), "width": int(uids.shape[1]),
            "image_id": image_id, "annotations": annotations}, skips


def load_cityscapes_parts(label_dir, image_dir, with_parts=False, dataset_name=None, num_workers=None):
    """detectron2 dicts for every ``<city>/*_gtFinePanopticParts.tif`` under ``label_dir``.

    Images are ``image_dir/<city>/<city>_<seq>_<frame>_leftImg8bit.png``. Objects are non-empty
    by construction (they are the pixels carrying their uid); unknown part ids are counted.
    """
    require_path(label_dir, "Cityscapes-Panoptic-Parts label folder")
    require_path(image_dir, "Cityscapes leftImg8bit folder")
    labels = sorted(glob.glob(os.path.join(label_dir, "*", "*" + LABEL_SUFFIX)))
    if not labels:
        raise FileNotFoundError(f"no '*{LABEL_SUFFIX}' files in {os.path.abspath(label_dir)}/<city>/ "
                                "(see datasets/README.md)")
    jobs = []
    for lf in labels:
        stem = os.path.basename(lf)[: -len(LABEL_SUFFIX)]
        city = os.path.basename(os.path.dirname(lf))
        jobs.append((lf, os.path.join(image_dir, city, stem + IMAGE_SUFFIX), stem))
    skips = SkipCounter(f"Cityscapes-Panoptic-Parts {dataset_name or label_dir}")
    dicts = []
    for record, image_skips in map_images(_load_label_image, jobs, num_workers):
        skips.merge(image_skips)
        if not with_parts:
            for ann in record["annotations"]:
                ann.pop("parts")
        dicts.append(record)
    skips.warn_summary(logger)
    require_path(dicts[0]["file_name"], "Cityscapes image of the first label file")
    return assign_ids(dicts)
