"""Where the miner gets its object masks: ground truth, a model's predictions, or a results file.

Every source is a callable ``source(dataset_dict, image) -> list[MinedObject]`` with masks at the
dataset dict's (original) resolution; ``image`` is the RGB uint8 HxWx3 array the miner read (only
the model source looks at it). Sources are registered in ``OBJECT_SOURCE_REGISTRY`` under the
names accepted by ``cfg.MINING.OBJECT_SOURCE`` and built with :func:`build_object_source`.
"""
import json
import logging
from collections import defaultdict
from typing import NamedTuple

import numpy as np
from detectron2.config import configurable
from detectron2.utils.registry import Registry

from ..utils.masks import segmentation_to_mask

__all__ = [
    "MinedObject",
    "OBJECT_SOURCE_REGISTRY",
    "GTObjectSource",
    "ModelObjectSource",
    "CocoResultsObjectSource",
    "build_object_source",
]

logger = logging.getLogger(__name__)

OBJECT_SOURCE_REGISTRY = Registry("MINING_OBJECT_SOURCE")
OBJECT_SOURCE_REGISTRY.__doc__ = "Object-mask providers of the part miner (cfg.MINING.OBJECT_SOURCE)."


class MinedObject(NamedTuple):
    """One object to mine parts from.

    source_id: id of the object in its source (GT annotation id, results-file row, prediction row).
    category_id: object class as the source numbers it (contiguous id for GT / model, raw for JSON).
    mask: HxW bool at the original image resolution.
    score: detection score (1.0 for ground truth).
    """

    source_id: int
    category_id: int
    mask: np.ndarray
    score: float


def _select(objects, score_thresh, topn):
    """Objects scoring >= score_thresh, best first (stable on ties), at most topn (0 = all)."""
    kept = [o for o in objects if o.score >= score_thresh]
    order = sorted(range(len(kept)), key=lambda i: -kept[i].score)
    kept = [kept[i] for i in order]
    return kept[:topn] if topn > 0 else kept


@OBJECT_SOURCE_REGISTRY.register()
class GTObjectSource:
    """Ground-truth instances of the dataset dict (``annotations``; crowd regions are not objects)."""

    def __call__(self, dataset_dict, image=None):
        h, w = dataset_dict["height"], dataset_dict["width"]
        out = []
        for j, ann in enumerate(dataset_dict.get("annotations", [])):
            if ann.get("iscrowd", 0):
                continue
            out.append(MinedObject(int(ann.get("id", j)), int(ann["category_id"]),
                                   segmentation_to_mask(ann["segmentation"], h, w), 1.0))
        return out


@OBJECT_SOURCE_REGISTRY.register()
class ModelObjectSource:
    """Objects predicted by an instance model.

    ``predictor(image_rgb_uint8, dataset_dict)`` returns detectron2 ``Instances`` with
    ``pred_masks`` [M, H, W], ``scores`` [M] and ``pred_classes`` [M] at the original resolution
    (the ``"instances"`` of docs/formats.md). Built from a config, the predictor is
    ``build_model(cfg)`` with ``MODEL.WEIGHTS`` loaded, run in eval mode on one image at a time.
    """

    @configurable
    def __init__(self, *, predictor, score_thresh=0.5, topn=20):
        self.predictor = predictor
        self.score_thresh = score_thresh
        self.topn = topn

    @classmethod
    def from_config(cls, cfg):
        return {"predictor": _ModelPredictor(cfg), "score_thresh": cfg.MINING.OBJECT_SCORE_THRESH,
                "topn": cfg.MINING.OBJECT_TOPN}

    def __call__(self, dataset_dict, image):
        inst = self.predictor(image, dataset_dict)
        h, w = dataset_dict["height"], dataset_dict["width"]
        if tuple(inst.image_size) != (h, w):
            raise ValueError(f"predictor returned masks of size {tuple(inst.image_size)} for an image of "
                             f"size {(h, w)} ({dataset_dict.get('file_name')})")
        masks = inst.pred_masks.cpu().numpy().astype(bool)
        scores = inst.scores.cpu().numpy().tolist()
        classes = inst.pred_classes.cpu().numpy().tolist()
        objs = [MinedObject(i, int(c), m, float(s)) for i, (m, s, c) in enumerate(zip(masks, scores, classes))]
        return _select(objs, self.score_thresh, self.topn)


class _ModelPredictor:
    """detectron2 model from the config, fed one image the way its ``INPUT.FORMAT`` expects."""

    def __init__(self, cfg):
        import torch
        from ..modeling.checkpoint import PartDistillCheckpointer
        from detectron2.modeling import build_model

        self.model = build_model(cfg.clone()).eval()
        PartDistillCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.input_format = cfg.INPUT.FORMAT
        self._torch = torch

    def __call__(self, image_rgb, dataset_dict):
        img = image_rgb[:, :, ::-1] if self.input_format == "BGR" else image_rgb
        tensor = self._torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1)))
        with self._torch.no_grad():
            out = self.model([{"image": tensor, "height": dataset_dict["height"],
                               "width": dataset_dict["width"]}])[0]
        return out["instances"]


@OBJECT_SOURCE_REGISTRY.register()
class CocoResultsObjectSource:
    """Objects from a COCO-results JSON (e.g. Detic outputs), matched to images by ``image_id``.

    Each row: ``{image_id, category_id, segmentation (RLE), score}``; ``category_id`` is kept as
    the file numbers it. Images with no row have no objects.
    """

    @configurable
    def __init__(self, *, results, score_thresh=0.5, topn=20, category_map=None):
        """``category_map``: {file category id: id to store} (e.g. detectron2's
        thing_dataset_id_to_contiguous_id); None keeps the file's ids. Unmapped ids raise."""
        self.category_map = category_map
        if isinstance(results, str):
            try:
                with open(results) as f:
                    results = json.load(f)
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"MINING.OBJECT_JSON={results!r} does not exist (a COCO-results JSON is needed "
                    "for MINING.OBJECT_SOURCE 'coco_json')") from None
        if not isinstance(results, list):
            raise ValueError("a COCO-results JSON must hold a list of {image_id, category_id, segmentation, score}")
        self.by_image = defaultdict(list)
        for row, r in enumerate(results):
            self.by_image[r["image_id"]].append((row, r))
        self.score_thresh = score_thresh
        self.topn = topn

    @classmethod
    def from_config(cls, cfg):
        category_map = None
        if cfg.MINING.OBJECT_JSON_CONTIGUOUS:
            category_map = _contiguous_map(cfg.MINING.DATASETS)
        return {"results": cfg.MINING.OBJECT_JSON, "score_thresh": cfg.MINING.OBJECT_SCORE_THRESH,
                "topn": cfg.MINING.OBJECT_TOPN, "category_map": category_map}

    def _category(self, raw):
        if self.category_map is None:
            return int(raw)
        if raw not in self.category_map:
            raise ValueError(f"category_id {raw} of MINING.OBJECT_JSON is not a category of MINING.DATASETS "
                             f"(known ids: {sorted(self.category_map)})")
        return int(self.category_map[raw])

    def __call__(self, dataset_dict, image=None):
        h, w = dataset_dict["height"], dataset_dict["width"]
        rows = self.by_image.get(dataset_dict["image_id"], [])
        # Cheap score filter before decoding masks: results files hold many low-score rows.
        objs = [MinedObject(row, self._category(r["category_id"]), None, float(r.get("score", 1.0)))
                for row, r in rows]
        objs = _select(objs, self.score_thresh, self.topn)
        segm = {row: r["segmentation"] for row, r in rows}
        return [o._replace(mask=segmentation_to_mask(segm[o.source_id], h, w)) for o in objs]


def _contiguous_map(dataset_names):
    """Union of the datasets' thing_dataset_id_to_contiguous_id (filled when they are loaded)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    out = {}
    for name in dataset_names:
        meta = MetadataCatalog.get(name)
        if not hasattr(meta, "thing_dataset_id_to_contiguous_id"):
            DatasetCatalog.get(name)
        mapping = getattr(meta, "thing_dataset_id_to_contiguous_id", None)
        if mapping is None:
            raise ValueError(f"MINING.OBJECT_JSON_CONTIGUOUS needs thing_dataset_id_to_contiguous_id in the "
                             f"metadata of {name!r}")
        for k, v in mapping.items():
            if out.get(k, v) != v:
                raise ValueError(f"datasets {list(dataset_names)} map category id {k} differently")
            out[k] = v
    return out


_NAMES = {"gt": "GTObjectSource", "model": "ModelObjectSource", "coco_json": "CocoResultsObjectSource"}


def build_object_source(cfg):
    """The object source named by ``cfg.MINING.OBJECT_SOURCE`` ("gt" | "model" | "coco_json")."""
    name = cfg.MINING.OBJECT_SOURCE
    if name not in _NAMES:
        raise ValueError(f"MINING.OBJECT_SOURCE must be one of {sorted(_NAMES)}, got {name!r}")
    cls = OBJECT_SOURCE_REGISTRY.get(_NAMES[name])
    return cls(cfg) if name != "gt" else cls()
