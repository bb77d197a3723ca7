"""``run_particle(cfg)``: PARTICLE's Algorithm 1 as a part_distill stage (PART_DISTILL.STAGE "particle").

    for it in 0 .. PARTICLE.ITERATIONS - 1:
        discovery  every image of PARTICLE.DATASETS (or a seeded subset) -> k-means part labels,
                   sharded across ranks and all-gathered, warm-started from iteration it - 1
        training   PARTICLE.STEPS_PER_ITER SGD steps of the part-contrastive loss (+ SelfPatch),
                   DDP across ranks, a fresh cosine schedule per iteration (paper Sec 5.4)
        output     OUTPUT_DIR/iter_<it>/model_final.pth  {"model": {"backbone.*"}, "particle": resume state}
                   OUTPUT_DIR/iter_<it>/iter.json        config hash, losses, images, timings
    OUTPUT_DIR/model_final.pth ({"model": backbone only}: MODEL.WEIGHTS for mining or any model)
    OUTPUT_DIR/manifest.json

An iteration is finished when its iter.json exists (written after its checkpoint); a resumed run
skips finished iterations and restarts from the last checkpoint, reproducing the same weights
(all randomness is seeded by (PARTICLE.SEED, iteration, step, rank)).
"""
import io
import json
import logging
import math
import os
import time

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.utils import comm
from detectron2.utils.events import EventStorage, JSONWriter, TensorboardXWriter
from tqdm import tqdm

from ..data.image_io import SkipCounter
from ..mining.features import BackboneFeatures
from ..mining.store import code_version, config_hash
from ..utils.io import atomic_write_bytes, atomic_write_json
from .augment import ParticleAugment
from .discovery import PartDiscovery, build_hypercolumn_extractor, discover_sharded
from .images import read_square_image
from .model import ParticleModel

__all__ = ["run_particle", "build_particle_model", "build_discovery", "particle_run_info", "iteration_dir"]

logger = logging.getLogger(__name__)

# Test hook: called with the iteration index after each finished (written) iteration.
_after_iteration_hook = None


def iteration_dir(output_dir, it):
    return os.path.join(output_dir, f"iter_{it}")


def _load_inputs(cfg):
    if not cfg.PARTICLE.DATASETS:
        raise ValueError("PARTICLE.DATASETS is empty: name the DatasetCatalog datasets to adapt the backbone to")
    dicts, inputs = [], []
    for name in cfg.PARTICLE.DATASETS:
        ds = DatasetCatalog.get(name)
        inputs.append({"name": name, "num_images": len(ds)})
        dicts += ds
    if not dicts:
        raise ValueError(f"PARTICLE.DATASETS {tuple(cfg.PARTICLE.DATASETS)} hold no images")
    return dicts, inputs


def particle_run_info(cfg, inputs):
    """What determines the adapted weights (hashed): PARTICLE.*, MODEL.*, input format, datasets."""
    body = {"PARTICLE": cfg.PARTICLE, "MODEL": cfg.MODEL, "INPUT.FORMAT": cfg.INPUT.FORMAT, "inputs": inputs}
    body = _plain(body)
    return dict(body, config_hash=config_hash(body))


def _plain(node):
    return json.loads(json.dumps(node))


def _selfpatch_options(cfg):
    sp = cfg.PARTICLE.SELFPATCH
    if not sp.ENABLED:
        return None
    return {"level": sp.LEVEL, "num_neighbors": sp.NUM_NEIGHBORS, "out_dim": sp.OUT_DIM,
            "student_temp": sp.STUDENT_TEMP, "teacher_temp": sp.TEACHER_TEMP, "num_heads": sp.NUM_HEADS,
            "weight": sp.WEIGHT}


def build_particle_model(cfg):
    """ParticleModel around the backbone of ``cfg.MODEL`` (MODEL.WEIGHTS loaded as mining loads it)."""
    c = cfg.clone()
    c.defrost()
    c.MINING.FEATURE_LEVELS = list(cfg.PARTICLE.CONTRAST_LEVELS)
    backbone = BackboneFeatures.from_config(c, kind="hypercolumn")["backbone"]
    p = cfg.PARTICLE
    # Head initialisation is seeded without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.SEED)
        model = ParticleModel(
            backbone, contrast_levels=list(p.CONTRAST_LEVELS), num_parts=p.NUM_PARTS,
            pixel_mean=tuple(cfg.MODEL.PIXEL_MEAN), pixel_std=tuple(cfg.MODEL.PIXEL_STD),
            input_format=cfg.INPUT.FORMAT, proj_hidden_dim=p.PROJ_HIDDEN_DIM, proj_dim=p.PROJ_DIM,
            pred_hidden_dim=p.PRED_HIDDEN_DIM, temperature=p.TEMPERATURE, contrast_weight=p.CONTRAST_WEIGHT,
            selfpatch=_selfpatch_options(cfg))
    return model.to(cfg.MODEL.DEVICE)


def build_discovery(cfg, backbone):
    """PartDiscovery over PARTICLE.DISCOVERY_LEVELS of ``backbone`` (shared with the online encoder)."""
    p = cfg.PARTICLE
    extractor = build_hypercolumn_extractor(backbone, list(p.DISCOVERY_LEVELS), cfg.MODEL.PIXEL_MEAN,
                                            cfg.MODEL.PIXEL_STD, cfg.INPUT.FORMAT)
    return PartDiscovery(extractor, p.NUM_PARTS, p.IMAGE_SIZE, batch_size=p.DISCOVERY_BATCH_SIZE,
                         max_iter=p.KMEANS_MAX_ITER, seed=p.SEED, device=cfg.MODEL.DEVICE)


def _iteration_images(cfg, n, it):
    k = cfg.PARTICLE.IMAGES_PER_ITER
    if k <= 0 or k >= n:
        return list(range(n))
    rng = np.random.default_rng([cfg.PARTICLE.SEED, it, 1 << 20])
    return sorted(rng.permutation(n)[:k].tolist())


def _lr(cfg, step):
    p = cfg.PARTICLE
    warm = min(1.0, (step + 1) / p.WARMUP_STEPS) if p.WARMUP_STEPS > 0 else 1.0
    return p.BASE_LR * warm * 0.5 * (1.0 + math.cos(math.pi * step / max(p.STEPS_PER_ITER, 1)))


def _batch(cfg, dicts, labels, keys, augment, rng, counter):
    """Two views of PARTICLE.BATCH_SIZE images drawn (with replacement) from ``keys``."""
    size = cfg.PARTICLE.IMAGE_SIZE
    views0, views1 = [], []
    for i in rng.choice(len(keys), size=cfg.PARTICLE.BATCH_SIZE, replace=True):
        idx = keys[int(i)]
        image = read_square_image(dicts[idx], size, counter)
        if image is None:
            continue
        (x0, l0), (x1, l1) = augment(image, labels[idx], rng)
        views0.append((x0, l0))
        views1.append((x1, l1))
    if not views0:
        raise RuntimeError("PARTICLE: no readable image in a training batch (see the skip warnings)")
    views = views0 + views1
    return torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views])


def _train_iteration(cfg, model, ddp_model, dicts, labels, it, storage, writers):
    p = cfg.PARTICLE
    rank = comm.get_rank()
    params = [q for name, q in model.named_parameters() if q.requires_grad and not name.startswith("target.")]
    opt = torch.optim.SGD(params, lr=p.BASE_LR, momentum=0.9, weight_decay=p.WEIGHT_DECAY)
    augment = ParticleAugment(p.CROP_SIZE, scale=tuple(p.CROP_SCALE))
    keys = sorted(labels)
    counter = SkipCounter("PARTICLE training images")
    device = torch.device(cfg.MODEL.DEVICE)
    losses, parts = [], []
    model.train()
    bar = tqdm(range(p.STEPS_PER_ITER), desc=f"particle train it{it}", unit="step", disable=not comm.is_main_process())
    for step in bar:
        rng = np.random.default_rng([p.SEED, it, step, rank])
        images, labs = _batch(cfg, dicts, labels, keys, augment, rng, counter)
        lr = _lr(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_dict, n_parts = ddp_model(images.to(device), labs.to(device))
        loss = sum(loss_dict.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"PARTICLE loss became {loss.item()} at iteration {it} step {step}: "
                                     f"lower PARTICLE.BASE_LR")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.momentum_update(p.MOMENTUM)
        reduced = {k: v.detach().item() for k, v in loss_dict.items()}
        if comm.get_world_size() > 1:
            gathered = comm.all_gather((reduced, n_parts))
            reduced = {k: float(np.mean([g[0][k] for g in gathered])) for k in reduced}
            n_parts = sum(g[1] for g in gathered)
        total = sum(reduced.values())
        losses.append(total)
        parts.append(n_parts)
        storage.iter = it * p.STEPS_PER_ITER + step
        storage.put_scalars(**{f"particle/{k}": v for k, v in reduced.items()}, smoothing_hint=False)
        storage.put_scalars(**{"particle/loss": total, "particle/lr": lr, "particle/parts_contrasted": n_parts},
                            smoothing_hint=False)
        bar.set_postfix(loss=f"{total:.3f}")
        if (step + 1) % 10 == 0 or step + 1 == p.STEPS_PER_ITER:
            for w in writers:
                w.write()
    bar.close()
    counter.warn_summary(logger)
    n_tail = max(1, min(5, len(losses)))
    return {"loss_mean": float(np.mean(losses)), "loss_first": float(np.mean(losses[:n_tail])),
            "loss_last": float(np.mean(losses[-n_tail:])), "losses": [round(v, 5) for v in losses],
            "parts_contrasted_mean": float(np.mean(parts)), "images_skipped": counter.as_dict()}


def _save_iteration(out_dir, it, model, centers, info):
    """model_final.pth then iter.json, both atomic: iter.json marks the iteration as finished."""
    d = iteration_dir(out_dir, it)
    os.makedirs(d, exist_ok=True)
    keys = sorted(centers)
    state = {"model": model.backbone_state_dict(),
             "particle": {"state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                          "center_index": keys,
                          "centers": torch.stack([centers[k] for k in keys]) if keys else torch.zeros(0),
                          "iteration": it}}
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(os.path.join(d, "model_final.pth"), buf.getvalue())
    atomic_write_json(os.path.join(d, "iter.json"), info, indent=1)


def _finished_iterations(cfg, run_hash):
    """Leading iterations with an iter.json of this config; a foreign one is an error, not overwritten."""
    done = []
    for it in range(cfg.PARTICLE.ITERATIONS):
        path = os.path.join(iteration_dir(cfg.OUTPUT_DIR, it), "iter.json")
        if not os.path.isfile(path):
            break
        with open(path) as f:
            info = json.load(f)
        if info.get("config_hash") != run_hash:
            raise ValueError(f"{path} was written with another PARTICLE/MODEL config (hash {info.get('config_hash')} "
                             f"!= {run_hash}); use a new OUTPUT_DIR or run without resuming to overwrite it")
        done.append(info)
    return done


def _restore(model, cfg, it):
    path = os.path.join(iteration_dir(cfg.OUTPUT_DIR, it), "model_final.pth")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["particle"]["state"])
    keys, cen = ckpt["particle"]["center_index"], ckpt["particle"]["centers"]
    return {int(k): cen[j] for j, k in enumerate(keys)}


def _writers(cfg):
    if not comm.is_main_process():
        return []
    return [JSONWriter(os.path.join(cfg.OUTPUT_DIR, "metrics.json")), TensorboardXWriter(cfg.OUTPUT_DIR)]


def run_particle(cfg, resume=True):
    """PARTICLE backbone adaptation; call on every rank. Returns {"particle": summary} (main process)."""
    p = cfg.PARTICLE
    if p.ITERATIONS < 1 or p.STEPS_PER_ITER < 0 or p.BATCH_SIZE < 1:
        raise ValueError("PARTICLE.ITERATIONS >= 1, STEPS_PER_ITER >= 0 and BATCH_SIZE >= 1 are required")
    dicts, inputs = _load_inputs(cfg)
    run_info = particle_run_info(cfg, inputs)
    run_hash = run_info["config_hash"]
    out = cfg.OUTPUT_DIR
    os.makedirs(out, exist_ok=True)
    done = _finished_iterations(cfg, run_hash) if resume else []
    comm.synchronize()

    model = build_particle_model(cfg)
    discovery = build_discovery(cfg, model.encoder.backbone)
    prev_centers = None
    if done:
        prev_centers = _restore(model, cfg, len(done) - 1)
        logger.info("PARTICLE: resuming after %d finished iteration(s) in %s", len(done), out)
    ddp_model = model
    if comm.get_world_size() > 1:
        from torch.nn.parallel import DistributedDataParallel

        # Levels outside CONTRAST_LEVELS may get no gradient in a step.
        ddp_model = DistributedDataParallel(model, find_unused_parameters=True)

    history = list(done)
    writers = _writers(cfg)
    with EventStorage(start_iter=len(done) * p.STEPS_PER_ITER) as storage:
        for it in range(len(done), p.ITERATIONS):
            t0 = time.perf_counter()
            indices = _iteration_images(cfg, len(dicts), it)
            warm = prev_centers if p.WARM_START else None
            labels, centers, skipped = discover_sharded(discovery, dicts, indices, it, warm)
            if comm.is_main_process():
                skipped.warn_summary(logger)
            if not labels:
                raise RuntimeError(f"PARTICLE discovery found no usable image in {tuple(p.DATASETS)}")
            t1 = time.perf_counter()
            stats = _train_iteration(cfg, model, ddp_model, dicts, labels, it, storage, writers)
            t2 = time.perf_counter()
            info = {"config_hash": run_hash, "iteration": it, "num_images": len(labels),
                    "images_skipped": skipped.as_dict(), "world_size": comm.get_world_size(),
                    "warm_started": warm is not None,
                    "time_s": {"discovery": round(t1 - t0, 2), "train": round(t2 - t1, 2), "total": round(t2 - t0, 2)},
                    **stats}
            if comm.is_main_process():
                _save_iteration(out, it, model, centers, info)
                logger.info("PARTICLE iteration %d: loss %.4f -> %.4f, %d images, %.1f s (discovery %.1f s)",
                            it, stats["loss_first"], stats["loss_last"], len(labels), t2 - t0, t1 - t0)
            comm.synchronize()
            history.append(info)
            prev_centers = centers
            if _after_iteration_hook is not None:
                _after_iteration_hook(it)
        for w in writers:
            w.close()

    summary = {"iterations": len(history), "final_loss": history[-1]["loss_last"],
               "loss_per_iteration": [h["loss_mean"] for h in history],
               "time_s_per_iteration": [h["time_s"]["total"] for h in history]}
    if comm.is_main_process():
        final = torch.load(os.path.join(iteration_dir(out, p.ITERATIONS - 1), "model_final.pth"),
                           map_location="cpu", weights_only=True)
        buf = io.BytesIO()
        torch.save({"model": final["model"]}, buf)
        atomic_write_bytes(os.path.join(out, "model_final.pth"), buf.getvalue())
        manifest = dict(run_info, code=code_version(), iterations=[{k: v for k, v in h.items() if k != "losses"}
                                                                     for h in history],
                        checkpoint=os.path.join(out, "model_final.pth"), summary=summary)
        atomic_write_json(os.path.join(out, "manifest.json"), manifest, indent=1)
    comm.synchronize()
    return {"particle": summary}
