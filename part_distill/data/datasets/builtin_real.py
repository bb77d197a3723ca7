"""Registers the real part datasets (layouts: datasets/README.md). Nothing is read at import.

Names (``_parts`` = the same images with each object's ``parts``, for evaluation / few-shot):

* ``pascal_part_{train,val}``, ``pascal_part_{train,val}_parts`` (coarse parts),
  ``pascal_part_fine_{train,val}_parts`` (Pascal-Part's own part names);
* ``part_imagenet_{train,val,test}``, ``part_imagenet_{train,val,test}_parts``;
* ``cityscapes_parts_{train,val}``, ``cityscapes_parts_{train,val}_parts``.

Paths are resolved under ``$DETECTRON2_DATASETS`` when a dataset is requested; a missing
folder or file raises ``DatasetNotFoundError`` naming the variable and the expected path.
"""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..fingerprint import register_fingerprint_sources
from .cityscapes_parts import cityscapes_parts_vocabulary, load_cityscapes_parts
from .partimagenet import PARTIMAGENET_PARTS, load_partimagenet, partimagenet_vocabulary
from .pascal_part import VOC_CLASSES, load_pascal_part, pascal_part_vocabulary, read_split_ids
from .real_common import datasets_root, object_metadata, require_path

__all__ = ["REAL_DATASETS", "register_real_part_datasets", "pascal_part_paths", "partimagenet_paths",
           "cityscapes_parts_paths", "required_paths"]

PASCAL_PART_SPLITS = ("train", "val")
PARTIMAGENET_SPLITS = ("train", "val", "test")
CITYSCAPES_SPLITS = ("train", "val")


def pascal_part_paths(split, root=None):
    """``(image_dir, annotation_dir, split_file)`` of Pascal-Part under ``root`` (default: env)."""
    base = os.path.join(root or datasets_root(), "pascal_part")
    return (os.path.join(base, "VOC2010", "JPEGImages"), os.path.join(base, "Annotations_Part"),
            os.path.join(base, "VOC2010", "ImageSets", "Main", f"{split}.txt"))


def partimagenet_paths(split, root=None):
    """``(json_file, image_root)`` of one PartImageNet split."""
    base = os.path.join(root or datasets_root(), "part_imagenet")
    return os.path.join(base, "annotations", split, f"{split}.json"), os.path.join(base, "images", split)


def cityscapes_parts_paths(split, root=None):
    """``(label_dir, image_dir)`` of one Cityscapes-Panoptic-Parts split."""
    base = os.path.join(root or datasets_root(), "cityscapes")
    return os.path.join(base, "gtFinePanopticParts", split), os.path.join(base, "leftImg8bit", split)


def _load_pascal_part(name, split, level):
    image_dir, anno_dir, split_file = pascal_part_paths(split)
    require_path(image_dir, "Pascal VOC2010 JPEGImages")
    require_path(anno_dir, "Pascal-Part annotation folder (Annotations_Part)")
    require_path(split_file, f"Pascal VOC2010 {split} list")
    return load_pascal_part(image_dir, anno_dir, read_split_ids(split_file), level, dataset_name=name)


def _load_partimagenet(name, split, with_parts):
    json_file, image_root = partimagenet_paths(split)
    dicts, (things, parts, _, _) = load_partimagenet(json_file, image_root, with_parts, dataset_name=name)
    if tuple(parts) != PARTIMAGENET_PARTS:
        # The registered metadata (class ids) would not describe these dicts.
        raise ValueError(f"{json_file}: categories {parts} differ from the released PartImageNet "
                         f"vocabulary {list(PARTIMAGENET_PARTS)}; load it with load_partimagenet() "
                         "and register it under another name.")
    return dicts


def _load_cityscapes(name, split, with_parts):
    label_dir, image_dir = cityscapes_parts_paths(split)
    return load_cityscapes_parts(label_dir, image_dir, with_parts, dataset_name=name)


def _register(name, loader, metadata, sources):
    DatasetCatalog.pop(name, None)
    MetadataCatalog.pop(name, None)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)
    register_fingerprint_sources(name, sources)


def _all_datasets():
    """name -> (loader, metadata, annotation sources), every real dataset; the sources (files and
    folders the annotations are read from) make its fingerprint (part_distill/data/fingerprint.py)."""
    out = {}
    coarse, fine = pascal_part_vocabulary("coarse"), pascal_part_vocabulary("fine")
    for split in PASCAL_PART_SPLITS:
        for name, level, vocab in ((f"pascal_part_{split}", None, coarse),
                                   (f"pascal_part_{split}_parts", "coarse", coarse),
                                   (f"pascal_part_fine_{split}_parts", "fine", fine)):
            out[name] = (lambda n=name, s=split, lv=level: _load_pascal_part(n, s, lv),
                         object_metadata(VOC_CLASSES, vocab[0], vocab[1], level is not None),
                         lambda s=split: pascal_part_paths(s)[1:])
    things, parts, object_parts, _ = partimagenet_vocabulary()
    for split in PARTIMAGENET_SPLITS:
        for name, with_parts in ((f"part_imagenet_{split}", False), (f"part_imagenet_{split}_parts", True)):
            out[name] = (lambda n=name, s=split, wp=with_parts: _load_partimagenet(n, s, wp),
                         object_metadata(things, parts, object_parts, with_parts),
                         lambda s=split: partimagenet_paths(s)[:1])
    things, parts, object_parts = cityscapes_parts_vocabulary()
    for split in CITYSCAPES_SPLITS:
        for name, with_parts in ((f"cityscapes_parts_{split}", False), (f"cityscapes_parts_{split}_parts", True)):
            out[name] = (lambda n=name, s=split, wp=with_parts: _load_cityscapes(n, s, wp),
                         object_metadata(things, parts, object_parts, with_parts),
                         lambda s=split: cityscapes_parts_paths(s)[:1])
    return out


REAL_DATASETS = tuple(_all_datasets())


def required_paths(name, root=None):
    """The files and folders the loader of real dataset ``name`` reads (what a missing-root error would
    name), without loading it; [] for a name that is not a real dataset."""
    for split in PASCAL_PART_SPLITS:
        if name in (f"pascal_part_{split}", f"pascal_part_{split}_parts", f"pascal_part_fine_{split}_parts"):
            return list(pascal_part_paths(split, root))
    for split in PARTIMAGENET_SPLITS:
        if name in (f"part_imagenet_{split}", f"part_imagenet_{split}_parts"):
            return list(partimagenet_paths(split, root))
    for split in CITYSCAPES_SPLITS:
        if name in (f"cityscapes_parts_{split}", f"cityscapes_parts_{split}_parts"):
            return list(cityscapes_parts_paths(split, root))
    return []


def register_real_part_datasets():
    """(Re-)register every real part dataset; idempotent."""
    for name, (loader, metadata, sources) in _all_datasets().items():
        _register(name, loader, metadata, sources)


register_real_part_datasets()
