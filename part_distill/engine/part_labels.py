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

import torch
from detectron2.utils import comm

from ..data.mappers import InstanceLSJMapper
from ..mining.miner import records_to_shard
from ..mining.object_sources import MinedObject
from ..mining.store import OBJECT_STRIDE, PART_STRIDE, PartStore, config_hash, finish_store
from ..modeling.meta_arch.postprocess import mask_quality, masks_to_output
from ..modeling.part_candidates import select_part_candidates
from ..utils.masks import decode_rle

__all__ = ["PartLabelFilters", "predict_part_queries", "part_scores", "object_part_labels",
           "write_part_label_store", "unwrap"]

logger = logging.getLogger(__name__)

# Test hook: called with the number of label shards this process has written after each one.
_after_shard_hook = None


class PartLabelFilters:
    """The Sec 4.2 / 4.3 rule that turns teacher queries into labels (see module docstring)."""

    def __init__(self, score_thresh=0.3, min_area_ratio=0.05, max_area_ratio=1.0):
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


def unwrap(model):
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def part_scores(class_logits, mask_logits):
    """s^p of every query [Q]: P(not no-object) x mask quality, the score the model's inference returns
    for a class-agnostic head (``part_inference``)."""
    prob = 1.0 - class_logits.float().softmax(-1)[:, -1]
    return prob * mask_quality(mask_logits, mask_logits > 0)


@torch.no_grad()
def predict_part_queries(model, batched_inputs, with_objects=False):
    """Raw part queries of a PartDistillationModel, at each input's output resolution.

    Returns per image ``{"mask_probs" [Q, H, W], "scores" [Q], "features" [Q, D]}`` plus, when
    ``with_objects``, ``"objects"``: D^o's Instances (pred_masks, pred_classes, scores).
    """
    m = unwrap(model)
    images = m.preprocess_image(batched_inputs)
    mask_features, multi_scale, part_mask_features = m.encode_for_parts(images.tensor)
    part_out = m.part_predictor(multi_scale, part_mask_features)
    obj_out = m.sem_seg_head.predictor(multi_scale, mask_features) if with_objects else None
    results = []
    for b, x in enumerate(batched_inputs):
        image_size = images.image_sizes[b]
        logits = masks_to_output(part_out["pred_masks"][b], images.tensor.shape[-2:], image_size,
                                 m.output_size(x, image_size))
        r = {"mask_probs": logits.sigmoid(), "scores": part_scores(part_out["pred_logits"][b], logits),
             "features": part_out["query_features"][b].float(), "class_logits": part_out["pred_logits"][b].float()}
        if with_objects:
            r["objects"] = m.objects_of(obj_out, b, images, x)
        results.append(r)
    return results


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
    (default: the test-time InstanceLSJMapper built by the caller).
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
            batch = items[b:b + batch_size]
            inputs = [mapper(dd) for _, dd in batch]
            preds = predict_part_queries(model, inputs, with_objects=objects == "predicted")
            for (index, dd), pred in zip(batch, preds):
                objs = _gt_objects(dd) if objects == "gt" else _predicted_objects(pred["objects"],
                                                                                  object_score_thresh)
                records.append({"index": index, "dataset_dict": dd, "skip_reason": None,
                                "objects": object_part_labels(pred, objs, filters, labeler)})
        store.write_shard(c, _shard(records, c, run_info["config_hash"]))
        if _after_shard_hook is not None:
            _after_shard_hook(n_done)
    model.train(was_training)
    return finish_store(store, run_info, num_chunks, "Part labels")


def build_label_mapper(cfg):
    """Test-time mapper (resize only, no annotations: objects come from the dataset dicts)."""
    return InstanceLSJMapper(**dict(InstanceLSJMapper.from_config(cfg, False), keep_annotations=False))


def dataset_inputs(names):
    """Concatenated dataset dicts of ``names`` (tagged with ``_mining_dataset``) and their summary."""
    from detectron2.data import DatasetCatalog

    dicts, summary = [], []
    for name in names:
        ds = DatasetCatalog.get(name)
        summary.append({"name": name, "num_images": len(ds)})
        dicts += [dict(d, _mining_dataset=name) for d in ds]
    if not dicts:
        raise ValueError(f"no images in {list(names)} (PART_DISTILL.SELF_TRAIN.DATASETS)")
    return dicts, summary


def file_sha256(path):
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
