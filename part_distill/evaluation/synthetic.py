"""Synthetic ground truth and predictions in the evaluators' formats, for tests and benchmarks.

Objects are random ellipses (later ones occlude earlier ones), split into disjoint parts by the
nearest of a few random seed points; predictions mix jittered GT parts with random blobs, so
IoUs span the whole 0..1 range. Nothing here is used to produce reported model numbers.
"""
import numpy as np
import torch

from detectron2.structures import Instances

from ..utils.masks import encode_rle


def _ellipse(rng, h, w, min_r=0.1, max_r=0.4):
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    ry, rx = rng.uniform(min_r, max_r) * h, rng.uniform(min_r, max_r) * w
    t = rng.uniform(0, np.pi)
    mask = np.zeros((h, w), dtype=bool)
    # Only the bounding square of the ellipse is evaluated: benchmarks draw ~1e5 of them.
    r = max(rx, ry)
    y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 2, h)
    x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 2, w)
    if y0 >= y1 or x0 >= x1:
        return mask
    dy, dx = np.mgrid[y0:y1, x0:x1]
    dy, dx = dy - cy, dx - cx
    u, v = dx * np.cos(t) + dy * np.sin(t), -dx * np.sin(t) + dy * np.cos(t)
    mask[y0:y1, x0:x1] = (u / rx) ** 2 + (v / ry) ** 2 <= 1
    return mask


def synthetic_parts_dataset(num_images, height=64, width=64, num_object_classes=3, parts_per_class=4,
                            max_objects=3, unlabeled_prob=0.3, empty_image_prob=0.1, seed=0):
    """(dataset dicts with nested ``parts``, metadata dict) in the ``*_parts`` format."""
    rng = np.random.default_rng(seed)
    object_part_classes = {c: list(range(c * parts_per_class, (c + 1) * parts_per_class))
                           for c in range(num_object_classes)}
    dicts, ann_id = [], 1
    for i in range(num_images):
        n_obj = 0 if rng.random() < empty_image_prob else int(rng.integers(1, max_objects + 1))
        masks = [_ellipse(rng, height, width) for _ in range(n_obj)]
        for a in range(n_obj):
            for b in range(a + 1, n_obj):
                masks[a] &= ~masks[b]
        anns = []
        for m in masks:
            if not m.any():
                continue
            c = int(rng.integers(num_object_classes))
            ys, xs = np.nonzero(m)
            k = int(rng.integers(1, parts_per_class + 1))
            seeds = rng.integers(len(ys), size=k)
            d = (ys[:, None] - ys[seeds][None]) ** 2 + (xs[:, None] - xs[seeds][None]) ** 2
            owner = d.argmin(axis=1)
            part_ids = rng.choice(object_part_classes[c], size=k, replace=False)
            parts = []
            for j in range(k):
                if rng.random() < unlabeled_prob / k:
                    continue  # leaves object pixels that no GT part labels
                pm = np.zeros_like(m)
                pm[ys[owner == j], xs[owner == j]] = True
                if pm.any():
                    parts.append({"category_id": int(part_ids[j]), "segmentation": encode_rle(pm), "id": ann_id})
                    ann_id += 1
            anns.append({"category_id": c, "segmentation": encode_rle(m), "iscrowd": 0, "id": ann_id,
                         "bbox": [0.0, 0.0, float(width), float(height)], "bbox_mode": 1, "parts": parts})
            ann_id += 1
        dicts.append({"file_name": f"synthetic_{i}.png", "height": height, "width": width,
                      "image_id": i, "annotations": anns})
    metadata = {"thing_classes": [f"object{c}" for c in range(num_object_classes)],
                "part_classes": [f"part{p}" for p in range(num_object_classes * parts_per_class)],
                "object_part_classes": object_part_classes, "evaluator_type": "parts"}
    return dicts, metadata


def synthetic_predictions(dataset_dict, num_parts, num_clusters=4, score_levels=0, seed=0, jitter=3):
    """A model output dict (``{"parts": Instances}``) for one image of ``synthetic_parts_dataset``.

    ``score_levels > 0`` quantises scores to that many values, creating ties."""
    from ..utils.masks import decode_rle

    rng = np.random.default_rng(seed)
    h, w = dataset_dict["height"], dataset_dict["width"]
    gt_parts = [(o, decode_rle(p["segmentation"])) for o, a in enumerate(dataset_dict["annotations"])
                for p in a["parts"]]
    n_obj = len(dataset_dict["annotations"])
    masks = np.zeros((num_parts, h, w), dtype=bool)
    owner = np.full(num_parts, -1, dtype=np.int64)
    for i in range(num_parts):
        if gt_parts and rng.random() < 0.6:
            o, m = gt_parts[int(rng.integers(len(gt_parts)))]
            m = np.roll(m, tuple(rng.integers(-jitter, jitter + 1, size=2)), axis=(0, 1))
            if rng.random() < 0.5:
                m = m | _ellipse(rng, h, w, 0.02, 0.1)
            masks[i], owner[i] = m, o
        else:
            masks[i] = _ellipse(rng, h, w, 0.03, 0.3)
            owner[i] = int(rng.integers(-1, n_obj)) if n_obj else -1
    scores = rng.random(num_parts)
    if score_levels:
        scores = np.floor(scores * score_levels) / score_levels
    classes = np.array([dataset_dict["annotations"][o]["category_id"] if o >= 0 else -1 for o in owner],
                       dtype=np.int64)
    flip = rng.random(num_parts) < 0.1  # some parts claim a wrong object class
    classes[flip] = rng.integers(0, 3, size=int(flip.sum()))
    clusters = rng.integers(-1, num_clusters, size=num_parts)
    inst = Instances((h, w))
    inst.pred_masks = torch.from_numpy(masks)
    inst.scores = torch.from_numpy(scores.astype(np.float32))
    inst.pred_clusters = torch.from_numpy(clusters)
    inst.object_index = torch.from_numpy(owner)
    inst.object_classes = torch.from_numpy(classes)
    return {"parts": inst}
