"""Mined part pseudo-labels (the store of part_distill.mining) as detectron2 training datasets.

Each image becomes a standard detectron2 dict whose ``annotations`` are its mined parts, all of the
single class "part" (category_id 0), each keeping ``object_id`` / ``object_category_id``, and whose
``objects`` are the owners of those parts (``id``, ``category_id``, RLE ``segmentation``). Filters
(``cfg.DATASETS.PSEUDO_LABELS.*``) are applied here, at read time, so one store serves every
setting: objects smaller than MIN_OBJECT_AREA_RATIO of the image lose all their parts, parts
smaller than MIN_PART_AREA_RATIO or larger than MAX_PART_AREA_RATIO of their object are dropped.
Images left without parts are kept (detectron2's FILTER_EMPTY_ANNOTATIONS decides).

``load_pseudo_labels`` returns one list holding the whole store; training instead streams a
registered store through ``store_dataset.StoreDataset`` (same dicts, memory independent of the
store's size), which the metadata set by ``register_pseudo_labels`` tells it how to read.
"""
import logging
import os
from typing import NamedTuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ..mining.store import PART_STRIDE, PartStore, read_manifest

__all__ = ["PseudoLabelFilters", "load_pseudo_labels", "register_pseudo_labels", "PART_LABEL_KEY",
           "check_cluster_store", "check_shard", "image_blocks", "image_dict", "store_root"]

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


def store_root(manifest_path):
    """The store directory of a manifest.json path or of the directory itself."""
    path = os.path.abspath(manifest_path)
    return path if os.path.isdir(path) else os.path.dirname(path)


def check_shard(shard, manifest, path):
    if shard["info"]["config_hash"] != manifest["config_hash"]:
        raise ValueError(f"{path} does not belong to its manifest (config hash differs)")


def image_blocks(shard, path):
    """``[(image, (a0, a1), (o0, o1))]``: each image of a shard with the index range of its parts in
    ``shard["annotations"]`` and of its objects in ``shard["objects"]``.

    The store writes an image's parts and objects consecutively (records_to_shard), which is what
    lets a reader decode one image's records alone; a shard breaking that is an error.
    """
    ranges = {}
    for key in ("annotations", "objects"):
        r, last = {}, None
        for n, rec in enumerate(shard[key]):
            i = rec["image_id"]
            if i != last:
                if i in r:
                    raise ValueError(f"{path}: the {key} of image {i} are not consecutive")
                r[i] = [n, n]
                last = i
            r[i][1] = n + 1
        ranges[key] = r
    empty = (0, 0)
    return [(img, tuple(ranges["annotations"].get(img["id"], empty)), tuple(ranges["objects"].get(img["id"], empty)))
            for img in shard["images"]]


def image_dict(img, parts, objects, filters, cluster_slots=0, part_labels=False, dropped=None):
    """The filtered detectron2 dict of one store image from its part and object records.

    ``part_labels`` keeps each part's PART_LABEL_KEY field (label stores of stage 4); ``dropped``
    (a dict) counts the filtered parts by reason.
    """
    objects = {o["id"]: o for o in objects}
    image_area = float(img["height"] * img["width"])
    anns = []
    for p in parts:
        obj = objects[p["object_id"]]
        reason = None
        if obj["area"] < filters.min_object_area_ratio * image_area:
            reason = "small_object"
        elif p["area"] / obj["area"] < filters.min_part_area_ratio:
            reason = "small_part"
        elif p["area"] / obj["area"] > filters.max_part_area_ratio:
            reason = "large_part"
        if reason is not None:
            if dropped is not None:
                dropped[reason] = dropped.get(reason, 0) + 1
            continue
        ann = {"bbox": p["bbox"], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
               "segmentation": p["segmentation"], "iscrowd": 0, "id": p["id"],
               "object_id": p["object_id"], "object_category_id": p["object_category_id"]}
        if cluster_slots:
            ann[PART_LABEL_KEY] = int(p["object_category_id"]) * cluster_slots + p["id"] % PART_STRIDE
        elif part_labels and PART_LABEL_KEY in p:
            ann[PART_LABEL_KEY] = p[PART_LABEL_KEY]
        anns.append(ann)
    # The owners of the kept parts: object-centric crops (MODEL.PART_DISTILL.OBJECT_CROP) and the
    # fit diagnostic need them.
    owner_ids = sorted({a["object_id"] for a in anns})
    owners = [{"id": o, "category_id": objects[o]["category_id"], "segmentation": objects[o]["segmentation"],
               "bbox": objects[o]["bbox"], "bbox_mode": BoxMode.XYWH_ABS, "iscrowd": 0} for o in owner_ids]
    return {"file_name": img["file_name"], "height": img["height"], "width": img["width"],
            "image_id": img["id"], "annotations": anns, "objects": owners}


def load_pseudo_labels(manifest_path, filters=PseudoLabelFilters(), cluster_slots=0, part_labels=False):
    """Read a finished store (manifest.json or its directory) into one list of detectron2 dicts, filtered.

    ``cluster_slots`` k > 0 also labels every part with PART_LABEL_KEY = object class x k + its
    cluster id (the one-stage baseline; the store must be dataset-level, see check_cluster_store);
    ``part_labels`` keeps the PART_LABEL_KEY a label store wrote. The list holds every mask of the
    store: training streams through :class:`~part_distill.data.store_dataset.StoreDataset` instead.
    """
    manifest = read_manifest(manifest_path)
    if cluster_slots:
        check_cluster_store(manifest, cluster_slots)
    root = store_root(manifest_path)
    store = PartStore(root)
    dropped = {"small_object": 0, "small_part": 0, "large_part": 0}
    out = []
    for entry in manifest["shards"]:
        shard = store.read_shard(os.path.basename(entry["file"]))
        path = os.path.join(root, entry["file"])
        check_shard(shard, manifest, path)
        for img, (a0, a1), (o0, o1) in image_blocks(shard, path):
            out.append(image_dict(img, shard["annotations"][a0:a1], shard["objects"][o0:o1], filters,
                                  cluster_slots, part_labels, dropped))
    logger.info("Pseudo-labels %s: %d images, %d parts kept, dropped %s (filters %s)", root, len(out),
                sum(len(d["annotations"]) for d in out), dropped, dict(filters._asdict()))
    return out


def register_pseudo_labels(name, manifest_path, filters=PseudoLabelFilters(), cluster_slots=0, part_labels=False):
    """Register ``name`` in DatasetCatalog as the filtered pseudo-labels of a store (single class "part",
    plus cluster-slot labels when ``cluster_slots`` > 0, or the store's own labels with ``part_labels``).

    The metadata keeps how to read the store, so the trainer can stream it (store_dataset.py)
    instead of calling the list loader.
    """
    path = os.path.abspath(manifest_path)
    # Idempotent: a resumed stage in the same process registers the same name again.
    DatasetCatalog.pop(name, None)
    MetadataCatalog.pop(name, None)
    DatasetCatalog.register(name, lambda: load_pseudo_labels(path, filters, cluster_slots, part_labels))
    MetadataCatalog.get(name).set(thing_classes=["part"], pseudo_label_manifest=path,
                                  pseudo_label_filters=dict(filters._asdict()),
                                  pseudo_label_cluster_slots=int(cluster_slots),
                                  pseudo_label_part_labels=bool(part_labels))
    return name
