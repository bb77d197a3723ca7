"""Ground truth of a ``*_parts`` dataset, indexed by image id and decoded one image at a time."""
import dataclasses
import logging

import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..utils.masks import decode_rle, polygons_to_mask
from .predictions import encode_transposed

logger = logging.getLogger(__name__)

UNLABELED_GT_MODES = ("ignore", "label")


def _decode(segmentation, height, width):
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, height, width)
    return decode_rle(segmentation)


@dataclasses.dataclass
class ImageGroundTruth:
    """GT of one image. Part label maps use -1 for object pixels that no GT part covers."""

    height: int
    width: int
    object_classes: np.ndarray          # [O] contiguous object class ids
    object_masks: np.ndarray            # [O, H, W] bool
    part_rles_t: list                   # all parts, object-major order, as ``encode_transposed`` RLEs
    part_label_maps: np.ndarray         # [O, H, W] int32 part class id, -1 = unlabeled / outside

    @property
    def num_parts(self):
        return len(self.part_rles_t)


class PartGroundTruth:
    """Ground truth of a part dataset: dataset dicts by image id plus the part metadata."""

    def __init__(self, dataset_name=None, dataset_dicts=None, metadata=None):
        if dataset_dicts is None:
            if dataset_name is None:
                raise ValueError("PartGroundTruth needs a registered dataset_name or dataset_dicts")
            dataset_dicts = DatasetCatalog.get(dataset_name)
        if metadata is None:
            metadata = MetadataCatalog.get(dataset_name) if dataset_name is not None else {}
        get = metadata.get if hasattr(metadata, "get") else (lambda k, d=None: getattr(metadata, k, d))
        self.thing_classes = list(get("thing_classes", []) or [])
        self.part_classes = list(get("part_classes", []) or [])
        # json round trips turn int keys into str; normalise to int.
        self.object_part_classes = {int(k): list(v) for k, v in (get("object_part_classes", {}) or {}).items()}
        self.dataset_name = dataset_name
        self._dicts = {}
        for d in dataset_dicts:
            if d["image_id"] in self._dicts:
                raise ValueError(f"duplicate image_id {d['image_id']!r} in dataset {dataset_name!r}")
            self._dicts[d["image_id"]] = d
        anns = [a for d in dataset_dicts for a in d.get("annotations", [])]
        if anns and not any("parts" in a for a in anns):
            raise ValueError(
                f"dataset {dataset_name!r} has no 'parts' in its annotations; part evaluators need a "
                "*_parts dataset (docs/formats.md)"
            )

    def object_class_name(self, c):
        return self.thing_classes[c] if 0 <= c < len(self.thing_classes) else str(c)

    def part_class_name(self, p):
        return self.part_classes[p] if 0 <= p < len(self.part_classes) else str(p)

    def image(self, image_id, need_part_maps=True):
        """Decode the GT of ``image_id``; a KeyError names the dataset when the id is unknown."""
        try:
            d = self._dicts[image_id]
        except KeyError:
            raise KeyError(f"image_id {image_id!r} is not in ground-truth dataset {self.dataset_name!r}") from None
        h, w = int(d["height"]), int(d["width"])
        anns = [a for a in d.get("annotations", []) if not a.get("iscrowd", 0)]
        obj_masks = np.zeros((len(anns), h, w), dtype=bool)
        label_maps = np.full((len(anns), h, w), -1, dtype=np.int32) if need_part_maps else None
        part_masks = []
        for i, a in enumerate(anns):
            obj_masks[i] = _decode(a["segmentation"], h, w)
            for p in a.get("parts", []):
                part_masks.append(_decode(p["segmentation"], h, w))
                if need_part_maps:
                    # Parts should be disjoint; where they are not, the later part wins (painter's order).
                    label_maps[i][part_masks[-1] & obj_masks[i]] = int(p["category_id"])
        classes = np.array([int(a["category_id"]) for a in anns], dtype=np.int64)
        part_rles_t = encode_transposed(np.stack(part_masks)) if part_masks else []
        return ImageGroundTruth(h, w, classes, obj_masks, part_rles_t, label_maps)
