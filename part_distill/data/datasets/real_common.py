"""Pieces shared by the real part-dataset loaders: root resolution, errors, record builders.

Every loader resolves its files under ``$DETECTRON2_DATASETS`` (default ``./datasets``) when the
dataset is requested, not at import, so the variable may be set after ``import part_distill``.
"""
import logging
import multiprocessing as mp
import os
from itertools import count

from ...utils.masks import encode_rle, mask_to_bbox_xywh

__all__ = [
    "DatasetNotFoundError",
    "datasets_root",
    "require_path",
    "object_record",
    "part_record",
    "object_metadata",
    "map_images",
    "assign_ids",
    "default_workers",
]

logger = logging.getLogger(__name__)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset file or folder is missing; the message names DETECTRON2_DATASETS and the path."""


def datasets_root():
    """``$DETECTRON2_DATASETS`` or ``datasets`` (relative to the working directory)."""
    return os.environ.get("DETECTRON2_DATASETS", "datasets")


def require_path(path, what, hint=""):
    """Return ``path`` if it exists, else raise ``DatasetNotFoundError`` saying where it was expected."""
    if os.path.exists(path):
        return path
    root = datasets_root()
    raise DatasetNotFoundError(
        f"{what} not found: expected {os.path.abspath(path)!r} "
        f"(DETECTRON2_DATASETS={root!r}{'' if 'DETECTRON2_DATASETS' in os.environ else ', unset: default'}; "
        f"set DETECTRON2_DATASETS to the folder holding the dataset, see datasets/README.md)."
        + (f" {hint}" if hint else ""))


def object_record(mask, category_id, obj_id):
    """detectron2 object annotation (docs/formats.md) from a non-empty HxW bool mask."""
    from detectron2.structures import BoxMode

    return {"bbox": mask_to_bbox_xywh(mask), "bbox_mode": BoxMode.XYWH_ABS, "category_id": int(category_id),
            "segmentation": encode_rle(mask), "iscrowd": 0, "id": int(obj_id)}


def part_record(mask, category_id, part_id):
    """Part annotation nested in an object's ``parts`` list (docs/formats.md)."""
    return {"category_id": int(category_id), "segmentation": encode_rle(mask), "id": int(part_id)}


def object_metadata(thing_classes, part_classes, object_part_classes, with_parts):
    """Metadata fields of an instance (``with_parts=False``) or part dataset."""
    meta = {"thing_classes": list(thing_classes)}
    if with_parts:
        meta.update(part_classes=list(part_classes),
                    object_part_classes={int(k): list(v) for k, v in object_part_classes.items()},
                    evaluator_type="parts")
    else:
        # Instance datasets are evaluated like COCO (detectron2 converts the dicts itself).
        meta.update(evaluator_type="coco")
    return meta




def default_workers(num_items):
    """Worker processes for decoding ``num_items`` annotation files: none for small jobs."""
    return 0 if num_items < 64 else max(1, min(8, (os.cpu_count() or 1)))


def map_images(fn, items, num_workers=None):
    """``[fn(item) for item in items]``, in a process pool when there are many items.

    ``fn`` must be a module-level function (it is pickled). Order is preserved.
    """
    items = list(items)
    num_workers = default_workers(len(items)) if num_workers is None else num_workers
    if num_workers <= 1:
        return [fn(item) for item in items]
    with mp.Pool(processes=num_workers) as pool:
        return pool.map(fn, items, chunksize=max(1, len(items) // (num_workers * 8)))


def assign_ids(dicts):
    """Number objects and parts 1, 2, ... in load order, after parallel decoding made them unordered."""
    obj_ids, part_ids = count(1), count(1)
    for d in dicts:
        for ann in d["annotations"]:
            ann["id"] = next(obj_ids)
            for part in ann.get("parts", ()):
                part["id"] = next(part_ids)
    return dicts
