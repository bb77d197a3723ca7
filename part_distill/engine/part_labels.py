"""Teacher predictions -> filtered part pseudo-labels in the mined-parts store format.

Used by self-training (Sec 4.2) and by the final distillation (Sec 4.3). For every image the teacher
predicts its part queries; each object (ground truth or D^o's, ``PART_DISTILL.SELF_TRAIN.OBJECTS``)
keeps the queries ``select_part_candidates`` accepts (score > SCORE_THRESH and winning at least
MIN_AREA_RATIO of the object under the pixel rule argmax_i M_i(x) s_i). The label of a kept query is
the set of object pixels it wins, so the labels of an object are disjoint and lie inside it (as the
mined parts do), and proposals not overlapping the object never become labels.

Output: a :class:`~part_distill.mining.store.PartStore` (COCO shards + run.json + manifest.json),
written with the miner's own ``records_to_shard``; ``cluster`` of a part is its candidate index in
the object, and every annotation also carries ``query_id``, ``score`` and, when a ``labeler`` is
given (stage 4), ``part_label``. Shards are numbered globally and rank r writes chunks
c % world_size == r, so the files do not depend on the world size and a rerun skips finished shards.
"""
import logging
import math

import numpy as np
import torch
from detectron2.utils import comm

from ..data.fingerprint import dataset_summary
from ..data.image_io import UnreadableImageError
from ..data.mappers import InstanceLSJMapper
from ..mining.miner import records_to_shard
from ..mining.object_sources import MinedObject
from ..mining.store import OBJECT_STRIDE, PART_STRIDE, PartStore, config_hash, finish_store
from ..modeling.meta_arch.postprocess import mask_quality
from ..modeling.part_candidates import select_part_candidates
from ..utils.hashing import file_sha256  # noqa: F401  (re-exported: the teacher's hash)
from ..utils.masks import decode_rle

__all__ = ["PartLabelFilters", "check_label_config", "predict_part_queries", "part_scores", "object_part_labels", "object_masks",
           "predict_with_objects",
           "write_part_label_store", "unwrap"]

logger = logging.getLogger(__name__)

# Test hook: called with the number of label shards this process has written after each one.
_after_shard_hook = None


class PartLabelFilters:
    """The Sec 4.2 / 4.3 rule that turns teacher queries into labels (see module docstring)."""

    def __init__(self, score_thresh=0.3, min_area_ratio=0.05, max_area_ratio=1.0):
        # Scores and area ratios lie in [0, 1]; outside it a filter keeps everything or nothing.
        if not 0.0 <= score_thresh <= 1.0:
            raise ValueError(f"PART_DISTILL.SELF_TRAIN.SCORE_THRESH must lie in [0, 1], got {score_thresh!r}")
        if not 0.0 <= min_area_ratio <= max_area_ratio <= 1.0:
            raise ValueError("PART_DISTILL.SELF_TRAIN.MIN_AREA_RATIO <= MAX_AREA_RATIO must lie in [0, 1], got "
                             f"{min_area_ratio!r}, {max_area_ratio!r}")
        self.score_thresh = float(score_thresh)
        self.min_area_ratio = float(min_area_ratio)
        self.max_area_ratio = float(max_area_ratio)

    @classmethod
    def from_config(cls, cfg):
        s = cfg.PART_DISTILL.SELF_TRAIN
        return cls(s.SCORE_THRESH, s.MIN_AREA_RATIO, s.MAX_AREA_RATIO)

    def as_dict(self):
        return {"score_thresh": self.score_thresh, "min_area_ratio": self.min_area_ratio,
                "max_area_ratio": self.max_area_ratio}


OBJECT_CHOICES = ("gt", "predicted")


def check_label_config(cfg):
    """Reject obviously invalid PART_DISTILL.SELF_TRAIN values with the key's name, before a teacher
    loads or a label store is stamped."""
    s = cfg.PART_DISTILL.SELF_TRAIN
    for key in ("SHARD_SIZE", "BATCH_SIZE"):
        if not isinstance(s[key], int) or isinstance(s[key], bool) or s[key] < 1:
            raise ValueError(f"PART_DISTILL.SELF_TRAIN.{key} must be an integer >= 1, got {s[key]!r}")
    if s.OBJECTS not in OBJECT_CHOICES:
        raise ValueError(f"PART_DISTILL.SELF_TRAIN.OBJECTS must be one of {OBJECT_CHOICES}, got {s.OBJECTS!r}")
    PartLabelFilters.from_config(cfg)


def unwrap(model):
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def part_scores(class_logits, mask_logits):
    """s^p of every query [Q]: P(not no-object) x mask quality, the score the model's inference returns
    for a class-agnostic head (``part_inference``)."""
    prob = 1.0 - class_logits.float().softmax(-1)[:, -1]
    return prob * mask_quality(mask_logits, mask_logits > 0)


@torch.no_grad()
def predict_part_queries(model, batched_inputs, with_objects=False, owner_masks=None, object_score_thresh=0.0):
    """Raw part queries of a PartDistillationModel, at each input's output resolution.

    Returns per image ``{"mask_probs" [Q, H, W], "scores" [Q], "features" [Q, D]}`` plus, when
    ``with_objects``, ``"objects"``: D^o's Instances (pred_masks, pred_classes, scores).
    A model on object-centric crops (MODEL.PART_DISTILL.OBJECT_CROP) crops ``owner_masks[i]``
    (Bool [M, H, W] at the output resolution) or, when None, D^o's objects scoring at least
    ``object_score_thresh``; its queries are those of all crops (Q = M x queries).
    """
    m = unwrap(model)
    images = m.preprocess_image(batched_inputs)
    crops = m.object_crop is not None
    need_objects = with_objects or (crops and owner_masks is None)
    feats = None
    if need_objects or not crops:
        feats = m.encode_for_parts(images.tensor, with_objects=need_objects, with_parts=not crops)
    part_out = None if crops else m.predict_parts(feats)
    obj_out = m.predict_objects(feats) if need_objects else None
    sizes = [m.output_size(x, images.image_sizes[b]) for b, x in enumerate(batched_inputs)]
    objects = [m.objects_of(obj_out, b, images, x) if need_objects else None for b, x in enumerate(batched_inputs)]
    owners = None
    if crops:
        owners = [torch.as_tensor(owner_masks[b] if owner_masks is not None else
                                  objects[b].pred_masks[objects[b].scores >= object_score_thresh],
                                  device=m.device).reshape(-1, *size).bool() for b, size in enumerate(sizes)]
    results = []
    for b, (class_logits, logits, features) in enumerate(m.part_outputs(images, part_out, owners, sizes)):
        r = {"mask_probs": logits.sigmoid(), "scores": part_scores(class_logits, logits),
             "features": features.float(), "class_logits": class_logits.float()}
        if with_objects:
            r["objects"] = objects[b]
        results.append(r)
    return results


def predict_with_objects(model, dataset_dicts, mapper, objects="gt", object_score_thresh=0.5, inputs=None):
    """[(objects, predict_part_queries output)] of dataset dicts: the GT objects of each dict (``objects``
    "gt") or D^o's scoring >= ``object_score_thresh``, as MinedObjects; crops (if any) are of those objects.
    ``inputs``: the dicts already mapped (default: ``mapper`` of each)."""
    gt = [_gt_objects(dd) for dd in dataset_dicts] if objects == "gt" else None
    owner_masks = None if gt is None else [object_masks(o, (dd["height"], dd["width"]))
                                           for o, dd in zip(gt, dataset_dicts)]
    inputs = [mapper(dd) for dd in dataset_dicts] if inputs is None else inputs
    preds = predict_part_queries(model, inputs, with_objects=objects == "predicted",
                                 owner_masks=owner_masks, object_score_thresh=object_score_thresh)
    objs = gt or [_predicted_objects(p["objects"], object_score_thresh) for p in preds]
    return list(zip(objs, preds))


def object_masks(objs, size):
    """Bool [M, H, W] of a list of MinedObject (the owners handed to predict_part_queries)."""
    if not objs:
        return torch.zeros((0, *size), dtype=torch.bool)
    return torch.from_numpy(np.stack([np.asarray(o.mask, dtype=bool) for o in objs]))


def _gt_objects(dd):
    objs = []
    for a in dd.get("annotations", []):
        if a.get("iscrowd", 0):
            continue
        objs.append(MinedObject(source_id=a.get("id"), category_id=int(a["category_id"]),
                                mask=decode_rle(a["segmentation"]), score=1.0))
    return objs


def _predicted_objects(instances, score_thresh):
    objs = []
    for j in range(len(instances)):
        score = float(instances.scores[j])
        if score < score_thresh:
            continue
        objs.append(MinedObject(source_id=j, category_id=int(instances.pred_classes[j]),
                                mask=instances.pred_masks[j].cpu().numpy(), score=score))
    return objs


def object_part_labels(pred, objects, filters, labeler=None):
    """Labels of one image: ``[(object, [(candidate index, won mask, extras dict), ...], reason)]``.

    ``labeler(pred, query_ids, object_class) -> LongTensor [n]`` gives each kept part a training
    label (-1 drops the part, counted as ``unranked``); without it every part is class "part".
    """
    out = []
    for obj in objects:
        mask = torch.as_tensor(obj.mask, device=pred["mask_probs"].device)
        q, won, ratio = select_part_candidates(
            pred["mask_probs"], pred["scores"], mask, filters.score_thresh, filters.min_area_ratio,
            filters.max_area_ratio)
        extras = [{"query_id": int(i), "score": round(float(pred["scores"][i]), 6)} for i in q]
        if labeler is not None and len(q):
            labels = labeler(pred, q, obj.category_id).tolist()
            for e, lab in zip(extras, labels):
                e["part_label"] = int(lab)
        parts = [(n, won[n].cpu().numpy(), e) for n, e in enumerate(extras)
                 if e.get("part_label", 0) >= 0]
        if len(parts) >= PART_STRIDE:
            raise ValueError(f"{len(parts)} parts in one object exceed the store's {PART_STRIDE - 1} slots; "
                             "raise PART_DISTILL.SELF_TRAIN.MIN_AREA_RATIO")
        reason = None if parts else ("no_candidates" if not len(q) else "unranked")
        out.append((obj, parts, reason))
    return out


def _shard(records, chunk, run_hash):
    """records_to_shard, then each part's extras (query id, score, label) added to its annotation."""
    extras = {}
    plain = []
    for rec in records:
        image_id = rec["index"] + 1
        objs = []
        for j, (obj, parts, reason) in enumerate(rec["objects"]):
            oid = image_id * OBJECT_STRIDE + j
            for n, _, e in parts:
                extras[oid * PART_STRIDE + n] = e
            objs.append((obj, [(n, m) for n, m, _ in parts], reason))
        plain.append(dict(rec, objects=objs))
    shard = records_to_shard(plain, chunk, run_hash)
    for a in shard["annotations"]:
        a.update(extras[a["id"]])
    for reason in ("no_candidates", "unranked"):
        shard["counts"]["instances_skipped"].setdefault(reason, 0)
    return shard


def label_run_info(config, dataset_dicts_summary):
    body = {"config": config, "inputs": {"datasets": dataset_dicts_summary}}
    return dict(body, config_hash=config_hash(body))


def write_part_label_store(model, dataset_dicts, store_dir, run_info, *, filters, objects="gt",
                           object_score_thresh=0.5, mapper=None, shard_size=64, batch_size=4,
                           labeler=None):
    """Label ``dataset_dicts`` (each with ``_mining_dataset``) with ``model`` into a store; all ranks.

    Rank r labels chunks c % world_size == r that are not on disk; rank 0 writes the manifest last
    and returns it (other ranks return None). ``mapper`` turns a dataset dict into a model input
    (default: the test-time InstanceLSJMapper built by the caller). An unreadable image is skipped
    and counted in the shard (``images_skipped``, with its file name in ``skipped_images``); a store
    with 0 kept parts raises :class:`~part_distill.mining.store.EmptyStoreError`.
    """
    store = PartStore(store_dir)
    rank, world = comm.get_rank(), comm.get_world_size()
    store.check_run(run_info)
    comm.synchronize()
    if comm.is_main_process():
        store.start_run(run_info)
    comm.synchronize()
    num_chunks = int(math.ceil(len(dataset_dicts) / shard_size))
    todo = [c for c in range(rank, num_chunks, world) if not store.has_shard(c)]
    was_training = model.training
    model.eval()
    for n_done, c in enumerate(todo, 1):
        items = list(enumerate(dataset_dicts[c * shard_size:(c + 1) * shard_size], c * shard_size))
        records = []
        for b in range(0, len(items), batch_size):
            batch, inputs = [], []
            for index, dd in items[b:b + batch_size]:
                try:
                    inputs.append(mapper(dd))
                    batch.append((index, dd))
                except UnreadableImageError as e:
                    logger.warning("Skipping image %s: %s", dd["file_name"], e)
                    records.append({"index": index, "dataset_dict": dd, "objects": [],
                                    "skip_reason": f"unreadable_image: {e.reason}"})
            if not batch:
                continue
            for (index, dd), (objs, pred) in zip(batch, predict_with_objects(
                    model, [dd for _, dd in batch], mapper, objects, object_score_thresh, inputs=inputs)):
                records.append({"index": index, "dataset_dict": dd, "skip_reason": None,
                                "objects": object_part_labels(pred, objs, filters, labeler)})
        records.sort(key=lambda r: r["index"])
        store.write_shard(c, _shard(records, c, run_info["config_hash"]))
        if _after_shard_hook is not None:
            _after_shard_hook(n_done)
    model.train(was_training)
    return finish_store(store, run_info, num_chunks, "Part labels",
                        empty_hint="no teacher query was kept: check the teacher (MODEL.WEIGHTS) and "
                                   "PART_DISTILL.SELF_TRAIN.SCORE_THRESH / MIN_AREA_RATIO / OBJECTS")


def build_label_mapper(cfg):
    """Test-time mapper (resize only, no annotations: objects come from the dataset dicts)."""
    return InstanceLSJMapper(**dict(InstanceLSJMapper.from_config(cfg, False), keep_annotations=False))


def dataset_inputs(names):
    """Concatenated dataset dicts of ``names`` (tagged with ``_mining_dataset``) and their summary."""
    from detectron2.data import DatasetCatalog

    dicts, summary = [], []
    for name in names:
        ds = DatasetCatalog.get(name)
        summary.append(dataset_summary(name, ds))  # with its fingerprint
        dicts += [dict(d, _mining_dataset=name) for d in ds]
    if not dicts:
        raise ValueError(f"no images in {list(names)} (PART_DISTILL.SELF_TRAIN.DATASETS)")
    return dicts, summary
