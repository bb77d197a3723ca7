"""Mined part pseudo-labels (the store of part_distill.mining) as detectron2 training datasets.

Each image becomes a standard detectron2 dict whose ``annotations`` are its mined parts, all of the
single class "part" (category_id 0), each keeping ``object_id`` / ``object_category_id``, and whose
``objects`` are the owners of those parts (``id``, ``category_id``, RLE ``segmentation``). Filters
(``cfg.DATASETS.PSEUDO_LABELS.*``) are applied here, at read time, so one store serves every
setting: objects smaller than MIN_OBJECT_AREA_RATIO of the image lose all their parts, parts
smaller than MIN_PART_AREA_RATIO or larger than MAX_PART_AREA_RATIO of their object are dropped.
Images left without parts are kept (detectron2's FILTER_EMPTY_ANNOTATIONS decides).
"""
import logging
import os
from typing import NamedTuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ..mining.store import PART_STRIDE, PartStore, read_manifest

__all__ = ["PseudoLabelFilters", "load_pseudo_labels", "register_pseudo_labels", "PART_LABEL_KEY",
           "check_cluster_store"]

# Annotation field of a part's class slot (object class x k + cluster), read via INPUT.PART_CLASS_KEY.
PART_LABEL_KEY = "part_label"

logger = logging.getLogger(__name__)


class PseudoLabelFilters(NamedTuple):
    min_object_area_ratio: float = 0.01
    min_part_area_ratio: float = 0.05
    max_part_area_ratio: float = 0.5

    @classmethod
    def from_config(cls, cfg):
        p = cfg.DATASETS.PSEUDO_LABELS
        return cls(p.MIN_OBJECT_AREA_RATIO, p.MIN_PART_AREA_RATIO, p.MAX_PART_AREA_RATIO)


def check_cluster_store(manifest, clusters_per_class):
    """A store whose cluster ids can serve as class slots: dataset-level, NUM_CLUSTERS == k."""
    mining = manifest.get("config", {}).get("MINING", {})
    if mining.get("LEVEL") != "dataset" or int(mining.get("NUM_CLUSTERS", -1)) != int(clusters_per_class):
        raise ValueError(f"cluster-id labels need a store mined with MINING.LEVEL 'dataset' and MINING.NUM_CLUSTERS "
                         f"= {clusters_per_class} (the class slots); this one has LEVEL {mining.get('LEVEL')!r}, "
                         f"NUM_CLUSTERS {mining.get('NUM_CLUSTERS')}: per-instance cluster ids are not comparable "
                         "across instances")


def load_pseudo_labels(manifest_path, filters=PseudoLabelFilters(), cluster_slots=0):
    """Read a finished store (manifest.json or its directory) into detectron2 dicts, filtered.

    ``cluster_slots`` k > 0 also labels every part with PART_LABEL_KEY = object class x k + its
    cluster id (the one-stage baseline; the store must be dataset-level, see check_cluster_store).
    """
    manifest = read_manifest(manifest_path)
    if cluster_slots:
        check_cluster_store(manifest, cluster_slots)
    root = os.path.dirname(os.path.abspath(manifest_path)) if not os.path.isdir(manifest_path) \
        else os.path.abspath(manifest_path)
    store = PartStore(root)
    dropped = {"small_object": 0, "small_part": 0, "large_part": 0}
    kept = 0
    out = []
    for entry in manifest["shards"]:
        shard = store.read_shard(os.path.basename(entry["file"]))
        if shard["info"]["config_hash"] != manifest["config_hash"]:
            raise ValueError(f"{entry['file']} in {root} does not belong to its manifest (config hash differs)")
        objects = {o["id"]: o for o in shard["objects"]}
        by_image = {}
        for p in shard["annotations"]:
            by_image.setdefault(p["image_id"], []).append(p)
        for img in shard["images"]:
            image_area = float(img["height"] * img["width"])
            anns = []
            for p in by_image.get(img["id"], []):
                obj = objects[p["object_id"]]
                if obj["area"] < filters.min_object_area_ratio * image_area:
                    dropped["small_object"] += 1
                    continue
                ratio = p["area"] / obj["area"]
                if ratio < filters.min_part_area_ratio:
                    dropped["small_part"] += 1
                    continue
                if ratio > filters.max_part_area_ratio:
                    dropped["large_part"] += 1
                    continue
                kept += 1
                ann = {"bbox": p["bbox"], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
                       "segmentation": p["segmentation"], "iscrowd": 0, "id": p["id"],
                       "object_id": p["object_id"], "object_category_id": p["object_category_id"]}
                if cluster_slots:
                    ann[PART_LABEL_KEY] = int(p["object_category_id"]) * cluster_slots + p["id"] % PART_STRIDE
                anns.append(ann)
            # The owners of the kept parts: object-centric crops (MODEL.PART_DISTILL.OBJECT_CROP) and the
            # fit diagnostic need them.
            owner_ids = sorted({a["object_id"] for a in anns})
            owners = [{"id": o, "category_id": objects[o]["category_id"], "segmentation": objects[o]["segmentation"],
                       "bbox": objects[o]["bbox"], "bbox_mode": BoxMode.XYWH_ABS, "iscrowd": 0} for o in owner_ids]
            out.append({"file_name": img["file_name"], "height": img["height"], "width": img["width"],
                        "image_id": img["id"], "annotations": anns, "objects": owners})
    logger.info("Pseudo-labels %s: %d images, %d parts kept, dropped %s (filters %s)",
                root, len(out), kept, dropped, dict(filters._asdict()))
    return out


def register_pseudo_labels(name, manifest_path, filters=PseudoLabelFilters(), cluster_slots=0):
    """Register ``name`` in DatasetCatalog as the filtered pseudo-labels of a store (single class "part",
    plus cluster-slot labels when ``cluster_slots`` > 0)."""
    path = os.path.abspath(manifest_path)
    # Idempotent: a resumed stage in the same process registers the same name again.
    DatasetCatalog.pop(name, None)
    MetadataCatalog.pop(name, None)
    DatasetCatalog.register(name, lambda: load_pseudo_labels(path, filters, cluster_slots))
    MetadataCatalog.get(name).set(thing_classes=["part"], pseudo_label_manifest=path,
                                  pseudo_label_filters=dict(filters._asdict()))
    return name
