"""Dataset mappers: detectron2 dataset dicts -> model inputs, with LSJ-style augmentation.

Training uses large-scale jitter (Mask2Former / the reference): random flip, ``ResizeScale``
(MIN_SCALE..MAX_SCALE of IMAGE_SIZE) and ``FixedSizeCrop`` to IMAGE_SIZE x IMAGE_SIZE (padded
bottom/right when the scaled image is smaller). Testing resizes the shortest edge.

``InstanceLSJMapper`` turns object annotations into ``"instances"`` (``gt_masks`` BitMasks,
``gt_classes``); ``PartTargetLSJMapper`` turns part pseudo-labels (annotations = parts, one class
"part" unless ``INPUT.PART_CLASS_KEY`` names a label field) into ``"parts"`` with the same fields,
so the part model can tell part targets from the objects of the same image.

Images are read with :func:`part_distill.data.image_io.read_image` (the reader of mining and
labelling: grayscale, CMYK, 16-bit, EXIF). When training, an unreadable image is skipped: the mapper
warns with its file name, adds it to ``skipped_images`` (a count shared by the DataLoader's worker
processes, which the trainer reports) and returns None, so detectron2's ``MapDataset`` draws another
image. At test time it raises :class:`~part_distill.data.image_io.UnreadableImageError` (naming the
file): an evaluation silently missing an image, or scoring another in its place, would be wrong.
"""
import copy
import logging
import multiprocessing

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Instances
from detectron2.utils.registry import Registry

from ..utils.masks import segmentation_to_mask
from .image_io import UnreadableImageError, read_image

__all__ = [
    "DATASET_MAPPER_REGISTRY",
    "build_dataset_mapper",
    "build_lsj_augmentation",
    "build_test_augmentation",
    "InstanceLSJMapper",
    "PartTargetLSJMapper",
    "SharedSkipCount",
]

logger = logging.getLogger(__name__)

DATASET_MAPPER_REGISTRY = Registry("DATASET_MAPPER")
DATASET_MAPPER_REGISTRY.__doc__ = """
Dataset mappers, built as ``cls(cfg, is_train)``; ``INPUT.DATASET_MAPPER_NAME`` picks the training one.
"""


def build_dataset_mapper(cfg, is_train=True, name=None):
    """The mapper ``name`` (default ``cfg.INPUT.DATASET_MAPPER_NAME``) built from ``cfg``."""
    return DATASET_MAPPER_REGISTRY.get(name or cfg.INPUT.DATASET_MAPPER_NAME)(cfg, is_train)


def build_lsj_augmentation(image_size, min_scale, max_scale, flip="horizontal"):
    """Large-scale-jitter augmentations: flip, ResizeScale, FixedSizeCrop (square ``image_size``)."""
    augs = []
    if flip:
        if flip not in ("horizontal", "vertical"):
            raise ValueError(f"INPUT.RANDOM_FLIP must be 'horizontal', 'vertical' or 'none', got {flip!r}")
        augs.append(T.RandomFlip(horizontal=flip == "horizontal", vertical=flip == "vertical"))
    augs += [
        T.ResizeScale(min_scale=min_scale, max_scale=max_scale,
                      target_height=image_size, target_width=image_size),
        # seg_pad_value=0: padding is background for the binary masks (255 would make it foreground).
        T.FixedSizeCrop(crop_size=(image_size, image_size), seg_pad_value=0),
    ]
    return augs


def build_test_augmentation(cfg):
    """Deterministic test-time resize of the shortest edge (detectron2's INPUT.*_SIZE_TEST)."""
    return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]


def annotation_mask(segmentation, height, width):
    """HxW uint8 mask of a COCO segmentation (RLE dict or polygon list)."""
    return segmentation_to_mask(segmentation, height, width).astype(np.uint8)


class SharedSkipCount:
    """Images a training mapper skipped and read, summed over the DataLoader's worker processes.

    The counts live in shared memory created with the mapper, so every worker (forked, or spawned
    with the dataset) adds to the same numbers the trainer reads.
    """

    # When this many images were skipped and none could be read yet, stop: MapDataset would redraw forever.
    GIVE_UP_AFTER = 100

    def __init__(self):
        self._counts = multiprocessing.Array("q", 2)  # [skipped, read]

    @property
    def skipped(self):
        return int(self._counts[0])

    def add_read(self):
        with self._counts.get_lock():
            self._counts[1] += 1

    def add_skip(self, file_name, reason):
        """Count a skip, warn with the file name; raise when nothing at all could be read so far."""
        with self._counts.get_lock():
            self._counts[0] += 1
            skipped, read = int(self._counts[0]), int(self._counts[1])
        logger.warning("Skipping unreadable training image %s (%s); %d image(s) skipped so far",
                       file_name, reason, skipped)
        if read == 0 and skipped >= self.GIVE_UP_AFTER:
            raise RuntimeError(f"the first {skipped} training images drawn were all unreadable (last: {file_name}: "
                               f"{reason}); check DATASETS.TRAIN and the dataset root")


@DATASET_MAPPER_REGISTRY.register()
class InstanceLSJMapper:
    """Reads the image, augments it, and transforms object annotations into ``"instances"``."""

    target_key = "instances"

    @configurable
    def __init__(self, is_train=True, *, augmentations, image_format, keep_annotations=None):
        """
        Args:
            augmentations: detectron2 augmentations applied to the image and the masks alike.
            image_format: ``read_image`` format ("RGB" for EfficientNet, "BGR" for detectron2 R50).
            keep_annotations: build targets from ``annotations``; default: only when training
                (at test time only models run with ground-truth objects need them).
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.keep_annotations = is_train if keep_annotations is None else keep_annotations
        self.skipped_images = SharedSkipCount() if is_train else None
        logger.info("%s (train=%s): %s", type(self).__name__, is_train, augmentations)

    @classmethod
    def from_config(cls, cfg, is_train=True):
        if is_train:
            augs = build_lsj_augmentation(
                cfg.INPUT.IMAGE_SIZE, cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE,
                "" if cfg.INPUT.RANDOM_FLIP == "none" else cfg.INPUT.RANDOM_FLIP,
            )
        else:
            augs = build_test_augmentation(cfg)
        return {
            "is_train": is_train,
            "augmentations": augs,
            "image_format": cfg.INPUT.FORMAT,
            "keep_annotations": is_train or cfg.MODEL.PART_DISTILL.OBJECTS == "gt",
        }

    def annotation_class(self, annotation):
        return annotation["category_id"]

    def __call__(self, dataset_dict):
        d = copy.deepcopy(dataset_dict)
        try:
            image = read_image(d["file_name"], format=self.image_format)
        except UnreadableImageError as e:
            if not self.is_train:
                raise
            self.skipped_images.add_skip(d["file_name"], e.reason)
            return None  # MapDataset draws another image in its place
        if self.is_train:
            self.skipped_images.add_read()
        utils.check_image_size(d, image)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        annotations = d.pop("annotations", None)
        if self.keep_annotations and annotations is not None:
            self.add_targets(d, annotations, transforms, image.shape[:2])
        return d

    def add_targets(self, d, annotations, transforms, image_size):
        d[self.target_key] = self.targets(annotations, transforms, (d["height"], d["width"]), image_size)

    def targets(self, annotations, transforms, source_size, image_size, id_key="", class_of=None):
        """Instances(gt_masks BitMasks[n, h, w], gt_classes Long[n] [, object_ids Long[n] from each
        annotation's ``id_key``]) in the augmented frame; classes by ``class_of`` (default annotation_class).

        Training drops crowd annotations and masks emptied by the crop (counted at debug level);
        testing keeps every annotation, so row i is annotation i (``object_index`` of "gt" objects).
        """
        if self.is_train:
            annotations = [a for a in annotations if a.get("iscrowd", 0) == 0]
        masks = [transforms.apply_segmentation(annotation_mask(a["segmentation"], *source_size))
                 for a in annotations]
        class_of = class_of or self.annotation_class
        classes = [int(class_of(a)) for a in annotations]
        instances = Instances(image_size)
        if masks:
            masks = torch.from_numpy(np.stack(masks)).bool()
        else:
            masks = torch.zeros((0, *image_size), dtype=torch.bool)
        classes = torch.tensor(classes, dtype=torch.int64)
        keep = masks.flatten(1).any(1) | (not self.is_train)
        if not bool(keep.all()):
            logger.debug("dropped %d targets emptied by the augmentation", int((~keep).sum()))
        instances.gt_masks = BitMasks(masks[keep])
        instances.gt_classes = classes[keep]
        if id_key:
            instances.object_ids = torch.tensor([int(a[id_key]) for a in annotations], dtype=torch.int64)[keep]
        return instances


@DATASET_MAPPER_REGISTRY.register()
class PartTargetLSJMapper(InstanceLSJMapper):
    """Part pseudo-labels (annotations = part masks) -> ``"parts"`` targets.

    Every part is class 0 ("part", stage 2) unless ``class_key`` names the annotation field that
    holds its label (e.g. the cluster slot of the stage-4 head).
    """

    target_key = "parts"

    @configurable
    def __init__(self, is_train=True, *, augmentations, image_format, keep_annotations=None, class_key=""):
        super().__init__(is_train, augmentations=augmentations, image_format=image_format,
                         keep_annotations=keep_annotations)
        self.class_key = class_key

    @classmethod
    def from_config(cls, cfg, is_train=True):
        ret = super().from_config(cfg, is_train)
        ret["keep_annotations"] = is_train
        ret["class_key"] = cfg.INPUT.PART_CLASS_KEY
        return ret

    def add_targets(self, d, annotations, transforms, image_size):
        """``"parts"`` and, when the dict lists its ``objects`` (part stores, *_parts targets), their
        owners as ``"part_objects"`` (gt_masks, gt_classes, object_ids = each part's ``object_id``)."""
        source_size = (d["height"], d["width"])
        objects = d.pop("objects", None)
        if objects is None:
            d[self.target_key] = self.targets(annotations, transforms, source_size, image_size)
            return
        d[self.target_key] = self.targets(annotations, transforms, source_size, image_size, id_key="object_id")
        d["part_objects"] = self.targets(objects, transforms, source_size, image_size, id_key="id",
                                         class_of=lambda a: a["category_id"])

    def annotation_class(self, annotation):
        if not self.class_key:
            return 0
        if self.class_key not in annotation:
            raise KeyError(f"part annotation {annotation.get('id')} has no field {self.class_key!r} "
                           "(INPUT.PART_CLASS_KEY)")
        return annotation[self.class_key]
