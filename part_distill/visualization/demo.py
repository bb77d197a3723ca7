"""The demo on users' images (``tools/demo.py``): part overlays + a predictions file.

Per input image ``<stem>.png`` is written to the output directory: rows ``[0, H)`` are the image
(width W) with each shown part blended with the colour of its (object class, cluster id), parts
outlined dark and objects outlined white (``contact_sheet``'s drawing), then a legend below
listing, per object class, the cluster ids shown and their colours. Parts without a cluster
(class-agnostic proposal models) are coloured one by one and listed as ``#i`` (rank in the image).
An image without a part above the confidence threshold still gets its overlay, with a legend that
says so. All predictions above the threshold go to ``predictions.json`` (``visualization.records``
format; an image without parts is a record with no parts). Inputs are files, globs or folders (the
image files directly inside, sorted by name); unreadable files, missing paths and folders without
images are counted and skipped, and inputs naming no image at all are an error.
"""
import glob
import logging
import os

import cv2
import numpy as np

from ..data.contact_sheet import _legend, _overlay, _text, palette
from ..data.image_io import SkipCounter, UnreadableImageError, read_image
from ..utils.io import atomic_write_bytes
from ..utils.masks import decode_rle, encode_rle, polygons_to_mask
from .predictor import PartPredictor, whole_image_objects
from .records import prediction_record, save_prediction_records

__all__ = ["part_colour", "select_parts", "draw_part_overlay", "expand_inputs", "NoInputImagesError",
           "GroundTruthObjects", "run_demo", "build_demo_parser", "demo_main"]

logger = logging.getLogger(__name__)

OBJECT_OUTLINE = (255, 255, 255)   # BGR outline of every owner object
PART_OUTLINE = (20, 20, 20)        # 1 px outline of every part
_UNCLUSTERED_OFFSET = 0.41         # hue offset separating per-part colours from cluster colours
# What a folder given as --input stands for (case-insensitive); other files there (a predictions.json,
# notes) are not images and are left out rather than counted as unreadable.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def part_colour(object_class, cluster_id, clusters_per_class, num_classes, rank=0):
    """BGR colour of a part: one colour per (object class, cluster) slot, so a cluster keeps its colour
    across images; parts without a cluster (-1) get a colour per ``rank`` instead."""
    if cluster_id < 0 or object_class < 0:
        return palette(rank + 1, offset=_UNCLUSTERED_OFFSET)[rank]
    slots = max(1, num_classes) * clusters_per_class
    return palette(slots)[(object_class * clusters_per_class + cluster_id) % slots]


def select_parts(parts, threshold):
    """Parts shown and saved: score >= threshold (Instances indexing keeps the score order)."""
    return parts[parts.scores >= threshold]


def _owner_objects(output, objects):
    """Owner masks Bool[M, H, W] and classes of the parts' ``object_index`` (formats.md)."""
    if objects is not None:
        return np.asarray(objects[0], bool), np.asarray(objects[1])
    inst = output["instances"]
    return inst.pred_masks.cpu().numpy().astype(bool), inst.pred_classes.cpu().numpy()


def draw_part_overlay(image_bgr, output, thing_classes, clusters_per_class, objects=None, threshold=None):
    """BGR uint8 [H + legend, W, 3]: parts of ``output["parts"]`` over the image (see module doc).

    ``objects``: the (masks, classes) the model was given, when it ran with given owners.
    ``threshold``: the score the parts were selected with, named by the legend of an image without parts.
    Parts are painted lowest score first, so where parts overlap the best one is on top.
    """
    parts = output["parts"]
    height, width = image_bgr.shape[:2]
    owner_masks, owner_classes = _owner_objects(output, objects)
    masks = parts.pred_masks.cpu().numpy().astype(bool)
    clusters = parts.pred_clusters.cpu().numpy()
    classes = parts.object_classes.cpu().numpy()
    owners = parts.object_index.cpu().numpy()
    num_classes = len(thing_classes)
    colours = [part_colour(int(c), int(k), clusters_per_class, num_classes, rank=i)
               for i, (c, k) in enumerate(zip(classes, clusters))]
    order = list(range(len(masks)))[::-1]
    canvas = _overlay(image_bgr, [masks[i] for i in order], [colours[i] for i in order], PART_OUTLINE)
    shown_owners = sorted({int(o) for o in owners if o >= 0})
    for o in shown_owners:
        contours, _ = cv2.findContours(owner_masks[o].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, contours, -1, OBJECT_OUTLINE, 1)
        ys, xs = np.nonzero(owner_masks[o])
        if len(xs):
            _text(canvas, _class_name(int(owner_classes[o]), thing_classes),
                  (int(xs.min()), max(10, int(ys.min()) - 2)), 0.4)
    legend = _legend_rows(width, classes, clusters, colours, thing_classes, masks.any(axis=(1, 2)))
    if not legend:
        legend = [_legend(width, [], _no_part_title(len(masks), threshold))]
    return np.concatenate([canvas] + legend, 0)


def _no_part_title(num_parts, threshold):
    """Legend of an overlay showing no part: an empty answer of the model, told apart from empty masks."""
    if num_parts:
        return f"{num_parts} part(s), all with empty masks"
    return "no part above threshold" if threshold is None else f"no part with score >= {threshold:g}"


def _class_name(c, thing_classes):
    return thing_classes[c] if 0 <= c < len(thing_classes) else f"class {c}" if c >= 0 else "no object"


def _legend_rows(width, classes, clusters, colours, thing_classes, visible):
    """One ``contact_sheet`` legend block per object class: its shown cluster ids and colours."""
    by_class = {}
    for i, (c, k) in enumerate(zip(classes, clusters)):
        if not visible[i]:
            continue  # an empty mask draws nothing, so it gets no legend entry
        label = f"k{int(k)}" if k >= 0 else f"#{i}"
        by_class.setdefault(int(c), {}).setdefault(label, colours[i])
    blocks = []
    for c in sorted(by_class, key=lambda c: (c < 0, c)):
        entries = sorted(by_class[c].items(), key=lambda e: (e[0][0], int(e[0][1:])))
        blocks.append(_legend(width, entries, f"{_class_name(c, thing_classes)}:"))
    return blocks


class NoInputImagesError(ValueError):
    """The inputs of a demo run name no image file at all."""


def expand_inputs(patterns, skips=None):
    """Files named by ``patterns`` (paths, globs or folders), in order, without duplicates.

    A folder stands for its image files (``IMAGE_EXTENSIONS``, not recursive), sorted by name.
    A pattern naming nothing is logged and counted in ``skips`` (a ``SkipCounter``): a missing path or
    a glob matching nothing as ``missing_input``, a folder without images as ``folder_without_images``.
    """
    skips = skips if skips is not None else SkipCounter("demo inputs")
    files = []
    for p in patterns:
        path = os.path.expanduser(p)
        matches = sorted(glob.glob(path)) if glob.has_magic(p) else [path] if os.path.exists(path) else []
        if not matches:
            logger.warning(f"--input {p!r} matches no file")
            skips.skip("missing_input", p)
        for m in matches:
            if not os.path.isdir(m):
                files.append(m)
                continue
            images = _folder_images(m)
            if not images:
                logger.warning(f"--input {p!r}: folder {m} holds no image file ({' '.join(IMAGE_EXTENSIONS)})")
                skips.skip("folder_without_images", m)
            files += images
    return list(dict.fromkeys(files))


def _folder_images(folder):
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]


class GroundTruthObjects:
    """Ground-truth objects of images, looked up by file name (full path, else base name).

    From a registered detectron2 dataset (docs/formats.md object dicts) or a COCO instances json
    (category ids mapped to contiguous ids in sorted order, as detectron2's loader does;
    ``from_coco_json`` also returns the sorted original ids).
    """

    def __init__(self, dataset_dicts):
        self._by_path, self._by_base = {}, {}
        for d in dataset_dicts:
            self._by_path[os.path.abspath(d["file_name"])] = d
            self._by_base.setdefault(os.path.basename(d["file_name"]), d)

    @classmethod
    def from_dataset(cls, name):
        from detectron2.data import DatasetCatalog
        return cls(DatasetCatalog.get(name))

    @classmethod
    def from_coco_json(cls, path, image_root=""):
        import json

        from detectron2.data.datasets import load_coco_json
        with open(path) as f:
            cat_ids = sorted(c["id"] for c in json.load(f).get("categories", []))
        contiguous = {c: i for i, c in enumerate(cat_ids)}
        dicts = load_coco_json(path, image_root)
        for d in dicts:
            for ann in d.get("annotations", []):
                ann["category_id"] = contiguous[ann["category_id"]]
        return cls(dicts), cat_ids

    def lookup(self, file_name, height, width):
        """(masks Bool[M, H, W], classes Long[M]) of ``file_name``, or None when it is not annotated."""
        d = self._by_path.get(os.path.abspath(file_name)) or self._by_base.get(os.path.basename(file_name))
        if d is None:
            return None
        masks, classes = [], []
        for ann in d.get("annotations", []):
            seg = ann.get("segmentation")
            if isinstance(seg, dict):
                m = decode_rle(seg)
            elif isinstance(seg, list) and seg:
                m = polygons_to_mask(seg, d.get("height", height), d.get("width", width))
            else:
                continue
            if m.shape != (height, width):
                m = cv2.resize(m.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)
            masks.append(m)
            classes.append(int(ann["category_id"]))
        return np.asarray(masks, bool).reshape(-1, height, width), np.asarray(classes, np.int64)


def run_demo(cfg, inputs, output_dir, *, objects="predicted", confidence_threshold=0.5,
             gt=None, thing_classes=None, whole_image_class=0, predictor=None):
    """Run the part model on every readable file of ``inputs`` and write overlays + predictions.json.

    Args:
        gt: a ``GroundTruthObjects`` (required for ``objects="gt"``); images it does not annotate
            are skipped and counted.
        thing_classes: object class names for the legend (default: ``class <id>``).
        whole_image_class: object class given to the whole-image object.
    Returns:
        dict: ``written`` (overlay paths), ``predictions`` (path), ``skipped`` (counts by reason).
    Raises:
        NoInputImagesError: ``inputs`` name no file at all (checked before the model is built).
    """
    if objects == "gt" and gt is None:
        raise ValueError("--objects gt needs ground-truth objects: pass --dataset NAME or --gt-json FILE")
    skips = SkipCounter("demo")
    files = expand_inputs(inputs, skips)
    if not files:
        raise NoInputImagesError(f"--input {' '.join(inputs)}: no image file found ({skips.summary()})")
    predictor = predictor or PartPredictor(cfg, objects=objects)
    thing_classes = list(thing_classes or [])
    clusters_per_class = cfg.MODEL.PART_DISTILL.CLUSTERS_PER_CLASS
    os.makedirs(output_dir, exist_ok=True)
    records, written, stems = [], [], set()
    for path in files:
        try:
            image = read_image(path, format="BGR")
        except UnreadableImageError as e:
            logger.warning(str(e))
            skips.skip("unreadable_image", path)
            continue
        h, w = image.shape[:2]
        owners = None
        if objects == "whole-image":
            owners = whole_image_objects(h, w, whole_image_class)
        elif objects == "gt":
            owners = gt.lookup(path, h, w)
            if owners is None:
                skips.skip("no_ground_truth", path)
                continue
        output = predictor(image, objects=owners)
        output["parts"] = select_parts(output["parts"], confidence_threshold)
        overlay = draw_part_overlay(image, output, thing_classes, clusters_per_class, objects=owners,
                                    threshold=confidence_threshold)
        stem = _unique_stem(path, stems)
        target = os.path.join(output_dir, stem + ".png")
        ok, png = cv2.imencode(".png", overlay)
        if not ok:
            raise RuntimeError(f"PNG encoding of the overlay of {path} failed")
        atomic_write_bytes(target, png.tobytes())
        written.append(target)
        given = None if owners is None else [{"segmentation": encode_rle(m)} for m in owners[0]]
        records.append(prediction_record(os.path.abspath(path), output, objects=given))
    predictions = save_prediction_records(os.path.join(output_dir, "predictions.json"), records,
                                          thing_classes=thing_classes or None)
    logger.info(f"demo: {len(written)} image(s) written to {output_dir}, {skips.total} skipped"
                + (f" ({skips.summary()})" if skips.total else ""))
    return {"written": written, "predictions": predictions, "skipped": skips.as_dict()}


def _unique_stem(path, used):
    """Output name of an input: its base name without extension, suffixed when two inputs share it."""
    stem = os.path.splitext(os.path.basename(path))[0] or "image"
    candidate, i = stem, 1
    while candidate in used:
        candidate, i = f"{stem}_{i}", i + 1
    used.add(candidate)
    return candidate


def build_demo_parser():
    import argparse
    p = argparse.ArgumentParser(
        description="Part overlays of a part model on image files (detectron2 demo convention).",
        epilog="Example: python tools/demo.py --config-file configs/parts_world/distill.yaml "
               "--input 'photos/*.jpg' --output out/demo --objects whole-image MODEL.DEVICE cpu")
    p.add_argument("--config-file", default="", metavar="FILE")
    p.add_argument("--input", nargs="+", required=True,
                   help="image files, globs or folders (a folder: the image files directly inside, sorted by name)")
    p.add_argument("--output", required=True, help="directory for <stem>.png overlays + predictions.json")
    p.add_argument("--objects", choices=("predicted", "gt", "whole-image"), default="predicted",
                   help="owners of the parts: the model's objects, ground truth, or the whole image")
    p.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum part score shown/saved")
    p.add_argument("--dataset", help="registered dataset: ground-truth objects (--objects gt) and class names")
    p.add_argument("--gt-json", help="COCO instances json with the ground-truth objects (--objects gt)")
    p.add_argument("--image-root", default="", help="image root of --gt-json")
    p.add_argument("--whole-image-class", type=int, default=0, help="object class of the whole-image object")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    return p


def demo_main(argv=None, register_world=True):
    """``tools/demo.py``; returns run_demo's summary.

    ``register_world``: re-register the parts world from PARTS_WORLD.* (command-line runs only;
    library callers keep the worlds they registered)."""
    from detectron2.data import MetadataCatalog

    from ..data.datasets.parts_world import register_parts_world_from_config
    from ..engine.setup import build_cfg

    parser = build_demo_parser()
    args = parser.parse_args(argv)
    cfg = build_cfg(args.config_file, args.opts)
    if register_world:
        register_parts_world_from_config(cfg)
    gt = None
    if args.objects == "gt":
        if args.gt_json:
            gt, _ = GroundTruthObjects.from_coco_json(args.gt_json, args.image_root)
        elif args.dataset:
            gt = GroundTruthObjects.from_dataset(args.dataset)
    names_from = args.dataset or (cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else None)
    thing_classes = MetadataCatalog.get(names_from).get("thing_classes", None) if names_from else None
    try:
        summary = run_demo(cfg, args.input, args.output, objects=args.objects,
                           confidence_threshold=args.confidence_threshold, gt=gt,
                           thing_classes=thing_classes, whole_image_class=args.whole_image_class)
    except NoInputImagesError as e:
        parser.error(str(e))
    skipped = sum(summary["skipped"].values())
    print(f"demo: wrote {len(summary['written'])} overlay(s) and {summary['predictions']}; "
          f"skipped {skipped}" + (f" {summary['skipped']}" if skipped else ""))
    return summary
