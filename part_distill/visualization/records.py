"""Saved part predictions: a small JSON record format, its reader/writer and converters.

A predictions file (what ``tools/make_collages.py --predictions`` reads) is::

    {"format": "part_distill.part_predictions", "version": 1,
     "thing_classes": ["car", ...],                # optional: object class names
     "images": [
       {"file_name": "/abs/or/relative/img.jpg", "height": H, "width": W,
        "parts": [
          {"segmentation": RLE,          # COCO RLE of the part, HxW (utils.masks.encode_rle)
           "score": float,               # part score (s^p or the ranker's r)
           "cluster_id": int,            # cluster within the object's class, -1 = none
           "object_class": int,          # contiguous object class (index into thing_classes), -1 = none
           "object_bbox": [x, y, w, h],  # optional: XYWH box of the owning object
           "object_segmentation": RLE},  # optional: mask of the owning object
          ...]},
       ...]}

A bare JSON list of the image records is accepted too. Without an object box or mask, tools that
need the object (collages crop it) fall back to the part's own box.
"""
import json

import numpy as np

from ..utils.io import atomic_write_json
from ..utils.masks import decode_rle, encode_rle, mask_to_bbox_xywh

__all__ = [
    "PREDICTIONS_FORMAT",
    "validate_records",
    "save_prediction_records",
    "load_prediction_records",
    "prediction_record",
    "records_from_part_dataset",
    "records_from_mined_shard",
]

PREDICTIONS_FORMAT = "part_distill.part_predictions"
_VERSION = 1
_PART_KEYS = ("segmentation", "score", "cluster_id", "object_class")


def validate_records(records, where="predictions"):
    """Raise ``ValueError`` naming the first malformed image record or part (by position)."""
    if not isinstance(records, list):
        raise ValueError(f"{where}: expected a list of image records, got {type(records).__name__}")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "file_name" not in rec or not isinstance(rec.get("parts"), list):
            raise ValueError(f"{where}: image record {i} needs 'file_name' and a 'parts' list")
        for j, part in enumerate(rec["parts"]):
            missing = [k for k in _PART_KEYS if k not in part]
            if missing:
                raise ValueError(f"{where}: image {i} ({rec['file_name']}) part {j} lacks {missing}; "
                                 f"each part needs {list(_PART_KEYS)}")
            if "size" not in part["segmentation"] or "counts" not in part["segmentation"]:
                raise ValueError(f"{where}: image {i} part {j}: 'segmentation' must be a COCO RLE dict")
    return records


def save_prediction_records(path, records, thing_classes=None):
    """Write ``records`` (validated) as a predictions file, atomically."""
    validate_records(records, str(path))
    doc = {"format": PREDICTIONS_FORMAT, "version": _VERSION, "images": records}
    if thing_classes is not None:
        doc["thing_classes"] = list(thing_classes)
    atomic_write_json(path, doc)
    return path


def load_prediction_records(path):
    """Read a predictions file -> ``(records, thing_classes or None)``."""
    with open(path) as f:
        doc = json.load(f)
    if isinstance(doc, list):
        return validate_records(doc, str(path)), None
    if doc.get("format") != PREDICTIONS_FORMAT:
        raise ValueError(f"{path}: not a part predictions file (format={doc.get('format')!r}, "
                         f"expected {PREDICTIONS_FORMAT!r}; see part_distill/visualization/records.py)")
    if doc.get("version") != _VERSION:
        raise ValueError(f"{path}: predictions format version {doc.get('version')!r} unsupported (want {_VERSION})")
    return validate_records(doc.get("images"), str(path)), doc.get("thing_classes")


def _numpy(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def prediction_record(file_name, output, objects=None):
    """One image record from a model output (docs/formats.md ``"parts"`` Instances).

    The owning object's mask is taken from ``output["instances"]`` via ``object_index``, or from
    ``objects`` (the image's GT annotations) when the model ran with ground-truth objects.
    """
    parts = output["parts"]
    h, w = parts.image_size
    masks = _numpy(parts.pred_masks).astype(bool)
    scores, clusters = _numpy(parts.scores), _numpy(parts.pred_clusters)
    owners, classes = _numpy(parts.object_index), _numpy(parts.object_classes)
    if objects is None and "instances" in output:
        obj_masks = _numpy(output["instances"].pred_masks).astype(bool)
        objects = [{"segmentation": encode_rle(m)} for m in obj_masks]
    out = []
    for i in range(len(masks)):
        part = {"segmentation": encode_rle(masks[i]), "score": float(scores[i]),
                "cluster_id": int(clusters[i]), "object_class": int(classes[i])}
        o = int(owners[i])
        if objects is not None and 0 <= o < len(objects):
            part["object_segmentation"] = objects[o]["segmentation"]
            part["object_bbox"] = mask_to_bbox_xywh(decode_rle(objects[o]["segmentation"]))
        out.append(part)
    return {"file_name": file_name, "height": int(h), "width": int(w), "parts": out}


def records_from_part_dataset(dataset_dicts):
    """Ground-truth parts (``*_parts`` dicts) as predictions: cluster id = part class id.

    A perfectly pure "method": useful as a reference row when rating and for documentation.
    """
    records = []
    for dd in dataset_dicts:
        parts = []
        for ann in dd["annotations"]:
            for p in ann.get("parts", []):
                parts.append({"segmentation": p["segmentation"], "score": 1.0,
                              "cluster_id": int(p["category_id"]), "object_class": int(ann["category_id"]),
                              "object_bbox": [float(v) for v in ann["bbox"]],
                              "object_segmentation": ann["segmentation"]})
        records.append({"file_name": dd["file_name"], "height": dd["height"], "width": dd["width"],
                        "parts": parts})
    return records


def records_from_mined_shard(shard):
    """A mined-parts store shard (part_distill/mining/store.py) as prediction records.

    Cluster id = the mining cluster, object class = ``object_category_id``, score = the object's score.
    """
    objects = {o["id"]: o for o in shard.get("objects", [])}
    by_image = {img["id"]: {"file_name": img["file_name"], "height": img["height"], "width": img["width"],
                            "parts": []} for img in shard["images"]}
    for p in shard["annotations"]:
        obj = objects.get(p["object_id"])
        if obj is None:
            raise ValueError(f"mined shard: part {p['id']} names object {p['object_id']}, absent from 'objects'")
        by_image[p["image_id"]]["parts"].append({
            "segmentation": p["segmentation"], "score": float(obj.get("score") or 1.0),
            "cluster_id": int(p["cluster"]), "object_class": int(p["object_category_id"]),
            "object_bbox": obj["bbox"], "object_segmentation": obj["segmentation"]})
    return [by_image[k] for k in sorted(by_image)]
