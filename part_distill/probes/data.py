"""What the probes read from a ``*_parts`` dataset: image subsets, frozen features, GT part label maps."""
import logging

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from tqdm import tqdm

from ..data.image_io import SkipCounter, read_image_or_skip
from ..evaluation.ground_truth import PartGroundTruth
from ..mining.ablation import _register_subset
from ..mining.miner import PartMiner

__all__ = ["IGNORE", "probe_subset", "semantic_part_labels", "extract_dense_features"]

logger = logging.getLogger(__name__)

# Label of object pixels that no GT part covers: left out of the loss and of the confusion matrix.
IGNORE = -1


def probe_subset(dataset_name, num_images):
    """Name of a registered dataset holding the first ``num_images`` images of ``dataset_name`` (0 = all).

    The subset keeps the part metadata, so the part evaluators accept it as they accept the source.
    """
    dicts = DatasetCatalog.get(dataset_name)
    if num_images <= 0 or num_images >= len(dicts):
        return dataset_name
    name = f"{dataset_name}_probe{num_images}"
    _register_subset(name, dicts[:num_images], metadata_from=dataset_name)
    return name


def semantic_part_labels(dataset_name):
    """``image_id -> [H, W] int64`` label map: 0 background, 1 + part class id, ``IGNORE`` unlabeled object pixels.

    Objects are painted in annotation order (a later object occludes an earlier one), as the
    evaluators' ground truth does for overlapping parts.
    """
    dicts = DatasetCatalog.get(dataset_name)
    gt = PartGroundTruth(dataset_name, dicts, MetadataCatalog.get(dataset_name))
    out = {}
    for d in dicts:
        g = gt.image(d["image_id"], need_part_maps=True)
        lab = np.zeros((g.height, g.width), dtype=np.int64)
        for obj, parts in zip(g.object_masks, g.part_label_maps):
            lab[obj] = np.where(parts[obj] >= 0, parts[obj] + 1, IGNORE)
        out[d["image_id"]] = lab
    return out


def extract_dense_features(extractor, dataset_dicts, image_size, batch_size, desc="features",
                           dtype=torch.float16):
    """Frozen features of every readable image: ``(image_ids, grids, resized_sizes, skips)``.

    Each grid is ``[D, gh, gw]`` on the extractor's grid of the image resized to long side
    ``image_size`` (the miner's resizing and padding, so probes and mining see the same features),
    stored as ``dtype`` on the CPU to keep a few hundred images in memory. Unreadable images are
    skipped and counted in ``skips`` (a ``SkipCounter``), never silently lost.
    """
    # The miner's resize/pad/crop step, reused without its object source and k-means.
    miner = PartMiner(object_source=None, feature_extractor=extractor, kmeans=None, image_size=image_size,
                      device=str(next(iter(extractor.buffers())).device))
    skips = SkipCounter(f"{desc} images")
    ids, grids, sizes = [], [], []
    for b in tqdm(range(0, len(dataset_dicts), batch_size), desc=desc, unit="batch"):
        batch, batch_ids = [], []
        for d in dataset_dicts[b:b + batch_size]:
            image = read_image_or_skip(d["file_name"], skips, format="RGB")
            if image is None:
                continue
            if image.shape[:2] != (d["height"], d["width"]):
                skips.skip("size_mismatch", f"{d['file_name']}: file is {image.shape[:2]}, dataset says "
                                            f"{(d['height'], d['width'])}")
                continue
            batch.append(np.ascontiguousarray(image))
            batch_ids.append(d["image_id"])
        if not batch:
            continue
        g, s = miner._extract(batch)
        ids += batch_ids
        grids += [x.to("cpu", dtype) for x in g]
        sizes += s
    skips.warn_summary()
    return ids, grids, sizes, skips

