"""Unlabeled image collections (the paper's ImageNet-1K / 21K training images) whose objects come from
an external detector's COCO-results files (Detic's output), as ordinary detectron2 instance dicts.

Every stage that needs objects reads GT-style ``annotations`` (mining's ``gt`` object source,
self-training / ranking / distillation with ``PART_DISTILL.SELF_TRAIN.OBJECTS "gt"``), so a registered
collection works with all of them unchanged. The rules (also in docs/formats.md):

* **Images**: every file with an image extension under ``image_root`` (ImageNet layout
  ``<wnid>/<name>.JPEG``, any depth), or the ``images`` list of a COCO-format json (``images_json``;
  its ``file_name`` relative to ``image_root``).
* **Image ids** (folder): ``1 +`` the position of the image's path relative to ``image_root``
  (POSIX separators) in the code-point-sorted list of all such paths. They are stable as long as the
  set of files is; a COCO image list keeps its own ``id``.
* **Matching results rows to images**: a row with ``file_name`` is matched by it (absolute and under
  ``image_root``, relative to ``image_root``, or -- when no relative path matches -- a basename that
  is unique in the collection); a row without one, or whose ``file_name`` matches nothing, by its
  ``image_id`` (the ids above). Unmatched rows are counted and logged.
* **Objects per image**: rows with ``score >= score_thresh``, best first (ties: file, then row order),
  at most ``topn`` (0 = all); ``category_id`` mapped to the vocabulary's contiguous id; empty masks
  dropped (counted; the index holds no areas, so they still took their top-n slot). Images left
  without an object are skipped, counted and logged.
* **Vocabulary** (``thing_classes``): a COCO / LVIS json (its ``categories`` list, or the list itself,
  ``{id, name}``; contiguous ids by sorted ``id``), a json list of names, or a text file with one name
  per line; for a plain list, entry ``i`` is ``category_id i`` (how Detic numbers a custom vocabulary).

Dict shape: ``{file_name, height, width, image_id, annotations: [{bbox (XYWH), bbox_mode, category_id,
segmentation (compressed RLE, str counts), iscrowd 0, id, score}]}``; height / width come from the
masks' RLE ``size`` (no image is opened), checked against a COCO image list when it gives them.
"""
import json
import logging
import os
import posixpath
from collections import Counter

import numpy as np
from pycocotools import mask as mask_util

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from .detection_results import NO_IMAGE_ID, expand_result_files, load_results_index, read_rows
from .real_common import assign_ids, datasets_root, require_path

__all__ = [
    "IMAGE_EXTENSIONS",
    "list_image_folder",
    "load_vocabulary",
    "build_image_collection",
    "register_image_collection",
    "register_image_collection_from_config",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_image_folder(image_root):
    """Sorted POSIX paths, relative to ``image_root``, of every image file under it (extension, any case)."""
    require_path(image_root, "image collection folder")
    out = []
    for dirpath, dirnames, filenames in os.walk(image_root, followlinks=True):
        dirnames.sort()
        rel = os.path.relpath(dirpath, image_root)
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                out.append(name if rel == "." else posixpath.join(*rel.split(os.sep), name))
    return sorted(out)


def load_vocabulary(path):
    """``(thing_classes, {results category_id: contiguous id})`` of a vocabulary file (module docstring)."""
    require_path(path, "detector vocabulary (DATASETS.IMAGE_COLLECTION.VOCABULARY)")
    if path.endswith(".json"):
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict):
            if "categories" not in data:
                raise ValueError(f"{path}: a vocabulary json object needs a 'categories' list")
            data = data["categories"]
        if not isinstance(data, list) or not data:
            raise ValueError(f"{path}: expected a non-empty list of names or of {{id, name}} categories")
        if all(isinstance(c, str) for c in data):
            names, ids = list(data), list(range(len(data)))
        elif all(isinstance(c, dict) and "id" in c and "name" in c for c in data):
            cats = sorted(data, key=lambda c: int(c["id"]))
            names, ids = [str(c["name"]) for c in cats], [int(c["id"]) for c in cats]
        else:
            raise ValueError(f"{path}: vocabulary entries must all be names or all be {{id, name}} dicts")
    else:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        ids = list(range(len(names)))
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate category ids in the vocabulary")
    return names, {i: c for c, i in enumerate(ids)}


def _read_image_list(images_json, image_root):
    """[(image_id, file_name relative to image_root, height or None, width or None)] of a COCO json."""
    require_path(images_json, "COCO image list (DATASETS.IMAGE_COLLECTION.IMAGES_JSON)")
    with open(images_json) as f:
        data = json.load(f)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{images_json}: a COCO-format json with an 'images' list is needed")
    out = []
    for im in images:
        name = im["file_name"]
        if os.path.isabs(name):
            name = os.path.relpath(name, image_root)
        out.append((int(im["id"]), posixpath.normpath(name.replace(os.sep, "/")), im.get("height"), im.get("width")))
    return out


class _Matcher:
    """Results keys -> position in the image list (rules in the module docstring)."""

    def __init__(self, images, image_root):
        self.root = os.path.abspath(image_root)
        self.by_id = {}
        for pos, (image_id, *_) in enumerate(images):
            if self.by_id.setdefault(image_id, pos) != pos:
                raise ValueError(f"duplicate image id {image_id} in the image collection at {image_root}")
        self.by_name = {name: pos for pos, (_, name, *_) in enumerate(images)}
        counts = Counter(posixpath.basename(name) for _, name, *_ in images)
        self.by_base = {posixpath.basename(name): pos for pos, (_, name, *_) in enumerate(images)
                        if counts[posixpath.basename(name)] == 1}

    def name(self, name):
        if os.path.isabs(name):
            rel = os.path.relpath(name, self.root)
            rel = None if rel.startswith("..") else rel.replace(os.sep, "/")
        else:
            rel = posixpath.normpath(name.replace(os.sep, "/"))
        if rel is not None and rel in self.by_name:
            return self.by_name[rel]
        return self.by_base.get(posixpath.basename(name.replace(os.sep, "/")), -1)

    def rows(self, index):
        """Image position of every row of a results index (-1 = no image)."""
        pos = np.full(len(index["offset"]), -1, dtype=np.int64)
        named = index["name_index"] >= 0
        if len(index["names"]):
            name_pos = np.array([self.name(str(n)) for n in index["names"]], dtype=np.int64)
            pos[named] = name_pos[index["name_index"][named]]
        # Rows without a file_name, or whose file_name matches nothing (e.g. a path on another machine), by id.
        by_id = (pos < 0) & (index["image_id"] != NO_IMAGE_ID)
        if by_id.any():
            ids, inverse = np.unique(index["image_id"][by_id], return_inverse=True)
            pos[by_id] = np.array([self.by_id.get(int(i), -1) for i in ids], dtype=np.int64)[inverse]
        return pos


def _candidate_rows(index, positions, score_thresh):
    """Compact arrays (row, image, score, offset, length) of one file's rows that match an image and
    pass the threshold: all that is kept of its index."""
    rows = np.nonzero((positions >= 0) & (index["score"] >= score_thresh))[0]
    return rows, positions[rows], index["score"][rows], index["offset"][rows], index["length"][rows]


def _select_rows(candidates, topn):
    """``(file, image, offset, length)`` arrays of the kept rows, grouped by image in image order, best
    score first (ties: file, then row order), at most ``topn`` per image."""
    file_no = np.concatenate([np.full(len(c[0]), f, dtype=np.int64) for f, c in enumerate(candidates)])
    row_no, image, score, offset, length = (np.concatenate([c[j] for c in candidates]) for j in range(5))
    order = np.lexsort((row_no, file_no, -score, image))
    if topn > 0 and len(order):
        img = image[order]
        starts = np.r_[0, np.nonzero(np.diff(img))[0] + 1]
        rank = np.arange(len(img)) - np.repeat(starts, np.diff(np.r_[starts, len(img)]))
        order = order[rank < topn]
    return file_no[order], image[order], offset[order], length[order]


def _compressed(segmentation, where):
    if not isinstance(segmentation, dict) or "size" not in segmentation or "counts" not in segmentation:
        raise ValueError(f"{where}: 'segmentation' must be a COCO RLE dict {{size, counts}} (Detic / "
                         "COCOEvaluator results); polygons are not supported for results rows")
    counts = segmentation["counts"]
    if isinstance(counts, list):
        rle = mask_util.frPyObjects(segmentation, *segmentation["size"])
    else:
        rle = {"size": list(segmentation["size"]),
               "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return rle


def build_image_collection(image_root, results, vocabulary, *, images_json="", score_thresh=0.5, topn=20,
                           dataset_name="image collection"):
    """``(dataset_dicts, counts)`` of an image collection (rules in the module docstring).

    ``results``: results files or globs (shards, concatenated in the given order). ``counts``:
    images listed / kept / skipped without objects, rows read, rows unmatched, empty masks dropped.
    """
    if images_json:
        images = _read_image_list(images_json, image_root)
    else:
        images = [(i + 1, name, None, None) for i, name in enumerate(list_image_folder(image_root))]
    _, category_map = load_vocabulary(vocabulary)
    files = expand_result_files(results)
    matcher = _Matcher(images, image_root)
    counts = {"images": len(images), "result_rows": 0, "result_rows_unmatched": 0, "objects_empty_mask": 0,
              "images_without_objects": 0}
    candidates = []
    for path in files:
        # One file's index at a time; only its candidate rows (matched, above threshold) are kept.
        index = load_results_index(path)
        positions = matcher.rows(index)
        counts["result_rows"] += len(positions)
        counts["result_rows_unmatched"] += int((positions < 0).sum())
        candidates.append(_candidate_rows(index, positions, score_thresh))
        del index, positions
    file_no, image, offset, length = _select_rows(candidates, topn)
    del candidates

    objects = {}  # image position -> [(selection order, row, file)]
    for f, path in enumerate(files):
        sel = np.nonzero(file_no == f)[0]
        for s, row in zip(sel, read_rows(path, offset[sel], length[sel])):
            objects.setdefault(int(image[s]), []).append((s, row, path))
    dicts = []
    for pos, (image_id, name, height, width) in enumerate(images):
        anns, size = [], None
        for s, row, path in sorted(objects.pop(pos, ()), key=lambda t: t[0]):
            where = f"{path} (image {name})"
            raw = int(row["category_id"])
            if raw not in category_map:
                raise ValueError(f"{where}: category_id {raw} is not in the vocabulary {vocabulary} "
                                 f"({len(category_map)} classes)")
            rle = _compressed(row["segmentation"], where)
            if size is None:
                size = tuple(int(v) for v in rle["size"])
            elif tuple(int(v) for v in rle["size"]) != size:
                raise ValueError(f"{where}: masks of sizes {size} and {tuple(rle['size'])} for one image")
            if mask_util.area(rle) == 0:
                counts["objects_empty_mask"] += 1
                continue
            anns.append({"bbox": [float(v) for v in mask_util.toBbox(rle)], "bbox_mode": BoxMode.XYWH_ABS,
                         "category_id": category_map[raw],
                         "segmentation": {"size": list(size), "counts": rle["counts"].decode("ascii")},
                         "iscrowd": 0, "score": float(row.get("score", 1.0))})
        if not anns:
            counts["images_without_objects"] += 1
            continue
        if height is not None and width is not None and (int(height), int(width)) != size:
            raise ValueError(f"{images_json}: image {name} is {height}x{width} but its masks are {size[0]}x{size[1]}")
        dicts.append({"file_name": os.path.join(image_root, name), "height": size[0], "width": size[1],
                      "image_id": image_id, "annotations": anns})
    counts["images_kept"] = len(dicts)
    assign_ids(dicts)
    logger.info("%s: %d of %d images have objects (%d skipped without any: none of their rows scored >= %s or "
                "matched); %d result rows in %d file(s), %d matched no image, %d empty masks dropped",
                dataset_name, len(dicts), len(images), counts["images_without_objects"], score_thresh,
                counts["result_rows"], len(files), counts["result_rows_unmatched"], counts["objects_empty_mask"])
    return dicts, counts


def register_image_collection(name, image_root, results, vocabulary, *, images_json="", score_thresh=0.5, topn=20):
    """Register ``name`` in DatasetCatalog / MetadataCatalog (re-registering replaces it).

    The vocabulary is read now, so ``thing_classes`` is known without loading the dicts; images and
    results are read when the dataset is first requested (and the results index cached beside them).
    """
    thing_classes, category_map = load_vocabulary(vocabulary)
    results = [results] if isinstance(results, str) else list(results)

    def load():
        return build_image_collection(image_root, results, vocabulary, images_json=images_json,
                                      score_thresh=score_thresh, topn=topn, dataset_name=name)[0]

    DatasetCatalog.pop(name, None)
    MetadataCatalog.pop(name, None)
    DatasetCatalog.register(name, load)
    # What determines the dicts, for manifests and fingerprints of the stages that read them.
    source = {"image_root": image_root, "images_json": images_json, "object_results": results,
              "vocabulary": vocabulary, "score_thresh": score_thresh, "topn": topn}
    MetadataCatalog.get(name).set(thing_classes=thing_classes, thing_dataset_id_to_contiguous_id=category_map,
                                  image_collection=source)


def _under_root(path):
    return path if not path or os.path.isabs(path) else os.path.join(datasets_root(), path)


def register_image_collection_from_config(cfg):
    """Register ``DATASETS.IMAGE_COLLECTION`` if it names one; relative paths are under $DETECTRON2_DATASETS."""
    c = cfg.DATASETS.IMAGE_COLLECTION
    if not c.NAME:
        return None
    for key in ("IMAGE_ROOT", "OBJECTS", "VOCABULARY"):
        if not c[key]:
            raise ValueError(f"DATASETS.IMAGE_COLLECTION.{key} must be set when DATASETS.IMAGE_COLLECTION.NAME "
                             f"({c.NAME!r}) is")
    register_image_collection(c.NAME, _under_root(c.IMAGE_ROOT), [_under_root(p) for p in c.OBJECTS],
                              _under_root(c.VOCABULARY), images_json=_under_root(c.IMAGES_JSON),
                              score_thresh=c.SCORE_THRESH, topn=c.TOPN)
    return c.NAME
