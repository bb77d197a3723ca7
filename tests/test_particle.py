"""PARTICLE + SelfPatch: Eq. 1-3 by hand, exact EMA, label-consistent views, resume, checkpoints, gloo."""
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import part_distill  # noqa: F401  (registers backbones and datasets)
from part_distill.data.datasets.parts_world import register_parts_world
from part_distill.data.parts_world import WorldSettings
from part_distill.engine.setup import build_cfg
from part_distill.mining.features import BackboneFeatures
from part_distill.particle import stage as stage_mod
from part_distill.particle.augment import ParticleAugment, ViewParams, apply_view, sample_view
from part_distill.particle.losses import mask_pool, neighbor_positives, part_contrastive_loss, selfpatch_loss
from part_distill.particle.momentum import ema_update_, make_target

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "parts_world" / "particle.yaml"
SETTINGS = WorldSettings(num_train=6, num_val=1, image_size=64, max_objects=2)


# ---------------------------------------------------------------- losses
def test_part_contrastive_loss_equals_hand_computation():
    pred = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    target = torch.tensor([[5.0, 0.0], [1.0, 1.0]])
    tau = 0.5
    # Latents rescaled to norm 1/sqrt(tau): p.p' = cos / tau. cos table rows = pred, cols = target.
    c = 1 / math.sqrt(2)
    l1 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(c / tau)))
    l2 = -math.log(math.exp(c / tau) / (math.exp(0 / tau) + math.exp(c / tau)))
    got = part_contrastive_loss(pred, target, tau)
    assert got.item() == pytest.approx((l1 + l2) / 2, rel=1e-6)


def test_mask_pool_equals_loop_reference():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 5, 4, 6, generator=g)
    labels = torch.randint(-1, 4, (2, 8, 12), generator=g)
    pooled, counts = mask_pool(feats, labels, 4)
    ref = torch.zeros(2, 4, 5)
    n = torch.zeros(2, 4)
    for b in range(2):
        for i in range(4):
            for j in range(6):
                m = int(labels[b, 2 * i, 2 * j])  # nearest neighbour of an exact 2x downsampling
                if m >= 0:
                    ref[b, m] += feats[b, :, i, j]
                    n[b, m] += 1
    ref = torch.where(n[..., None] > 0, ref / n.clamp_min(1)[..., None], ref)
    assert torch.equal(counts, n)
    assert torch.allclose(pooled, ref, atol=1e-6)


def test_selfpatch_neighbours_and_loss_equal_hand_computation():
    # A 1x3 patch grid: a=(1,0), b=(2,1) (closer to a than to c), c=(0,1).
    feats = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]]).view(1, 2, 1, 3)
    index, valid = neighbor_positives(feats, 1)
    assert index.view(-1).tolist() == [1, 0, 1] and bool(valid.all())
    index4, valid4 = neighbor_positives(feats, 4)
    assert valid4.sum(-1).view(-1).tolist() == [1, 2, 1]  # border patches have fewer neighbours

    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])
    t = torch.tensor([[[0.5, 0.0], [0.0, 0.5], [0.2, 0.1]]])
    ts, tt = 0.1, 0.04
    expect = []
    for i, j in enumerate([1, 0, 1]):
        pt = np.exp(t[0, j].numpy() / tt) / np.exp(t[0, j].numpy() / tt).sum()
        ls = s[0, i].numpy() / ts - np.log(np.exp(s[0, i].numpy() / ts).sum())
        expect.append(-(pt * ls).sum())
    got = selfpatch_loss(s, t, index, valid, ts, tt)
    assert got.item() == pytest.approx(float(np.mean(expect)), rel=1e-5)
    # Invalid (padded) positives do not count: k=4 averages over the 4 real pairs only.
    expect4 = []
    for i, js in enumerate([[1], [0, 2], [1]]):
        for j in js:
            pt = np.exp(t[0, j].numpy() / tt) / np.exp(t[0, j].numpy() / tt).sum()
            ls = s[0, i].numpy() / ts - np.log(np.exp(s[0, i].numpy() / ts).sum())
            expect4.append(-(pt * ls).sum())
    assert selfpatch_loss(s, t, index4, valid4, ts, tt).item() == pytest.approx(float(np.mean(expect4)), rel=1e-5)


# ---------------------------------------------------------------- momentum
def test_momentum_update_is_exact_and_copies_buffers():
    online = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    target = make_target(online)
    assert all(not p.requires_grad for p in target.parameters())
    with torch.no_grad():
        for k, p in enumerate(target.parameters()):
            p.copy_(torch.full_like(p, 1.0 + k))
        for k, p in enumerate(online.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=p.dtype).view_as(p) * 0.25 - k)
        online[1].running_mean.copy_(torch.tensor([3.0, -1.0]))
    before = [p.clone() for p in target.parameters()]
    ema_update_(target, online, 0.75)
    for t0, t, s in zip(before, target.parameters(), online.parameters()):
        assert torch.equal(t, 0.75 * t0 + 0.25 * s)
    assert torch.equal(target[1].running_mean, torch.tensor([3.0, -1.0]))
    ema_update_(target, online, 0.0)
    assert all(torch.equal(t, s) for t, s in zip(target.parameters(), online.parameters()))


# ---------------------------------------------------------------- augmentation
def _label_image(h=32, w=24):
    labels = torch.arange(h * w).view(h, w) % 7
    image = labels[None].repeat(3, 1, 1).float() / 10.0
    return image, labels


def test_flip_and_crop_move_the_label_map_with_the_image():
    image, labels = _label_image(32, 32)
    # Whole image, upsampled 2x (nearest and bilinear 2x resizing commute with a flip).
    im, lab = apply_view(image, labels, ViewParams(crop=(0, 0, 32, 32), flip=True), 64)
    ref_im, ref_lab = apply_view(image.flip(-1), labels.flip(-1), ViewParams(crop=(0, 0, 32, 32)), 64)
    assert torch.equal(lab, ref_lab) and torch.allclose(im, ref_im, atol=1e-6)
    assert torch.equal(lab, labels.flip(-1).repeat_interleave(2, 0).repeat_interleave(2, 1))
    image, labels = _label_image()
    # A crop at the output size is a plain slice of both.
    im, lab = apply_view(image, labels, ViewParams(crop=(8, 4, 16, 16), flip=True), 16)
    assert torch.equal(lab, labels[8:24, 4:20].flip(-1))
    assert torch.allclose(im, image[:, 8:24, 4:20].flip(-1))
    # Photometric ops change the image only.
    _, lab = apply_view(image, labels, ViewParams(crop=(8, 4, 16, 16), jitter=((3, 2, 1, 0), (1.3, 0.7, 1.1, 0.05)),
                                                  blur_sigma=1.5, solarize=True), 16)
    assert torch.equal(lab, labels[8:24, 4:20])


def test_augment_is_seeded_and_upsamples_coarse_labels():
    rng_img = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    grid = torch.arange(16).view(4, 4)
    aug = ParticleAugment(16, scale=(0.3, 1.0))
    a = aug(rng_img, grid, np.random.default_rng(7))
    b = aug(rng_img, grid, np.random.default_rng(7))
    for (xa, la), (xb, lb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(la, lb)
    # Brute force: replay the two views' parameters, then pixel (i, j) of a view shows grid cell
    # ((top + floor(i h / S)) // 8, (left + floor(j' w / S)) // 8), j' mirrored when the view is flipped
    # (the 4x4 grid covers the 32x32 image in 8x8-pixel cells; nearest neighbour takes floor(dst * in / out)).
    rng = np.random.default_rng(7)
    params = [sample_view(rng, 32, 32, v, (0.3, 1.0)) for v in (0, 1)]
    assert [p.flip for p in params] == [True, False] and all(p.crop[2:] != (32, 32) for p in params)
    size = 16
    for (_, lab), p in zip(a, params):
        top, left, h, w = p.crop
        expected = torch.empty(size, size, dtype=torch.int64)
        for i in range(size):
            for j in range(size):
                jj = size - 1 - j if p.flip else j
                expected[i, j] = grid[(top + i * h // size) // 8, (left + jj * w // size) // 8]
        assert torch.equal(lab, expected), p


# ---------------------------------------------------------------- the stage
def _cfg(out_dir, *opts):
    return build_cfg(str(CONFIG), [
        "OUTPUT_DIR", str(out_dir), "PARTICLE.ITERATIONS", "2", "PARTICLE.STEPS_PER_ITER", "2",
        "PARTICLE.BATCH_SIZE", "2", "PARTICLE.IMAGES_PER_ITER", "0", "PARTICLE.IMAGE_SIZE", "64",
        "PARTICLE.CROP_SIZE", "64", "PARTICLE.NUM_PARTS", "4", "PARTICLE.KMEANS_MAX_ITER", "20",
        "PARTICLE.DISCOVERY_BATCH_SIZE", "4", *opts])


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_world_factory):
    root = tiny_world_factory(SETTINGS)
    out = tmp_path_factory.mktemp("particle") / "full"
    res = stage_mod.run_particle(_cfg(out))
    yield {"root": root, "out": out, "res": res, "tmp": tmp_path_factory}


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_killed_run_resumes_without_redoing_finished_iterations(world, monkeypatch):
    out = world["tmp"].mktemp("resumed") / "run"

    def kill(it):
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(stage_mod, "_after_iteration_hook", kill)
    with pytest.raises(KeyboardInterrupt):
        stage_mod.run_particle(_cfg(out))
    assert os.path.isfile(out / "iter_0" / "iter.json") and not os.path.exists(out / "iter_1")
    monkeypatch.setattr(stage_mod, "_after_iteration_hook", None)
    seen = []
    real = stage_mod.discover_sharded

    def spy(discovery, dicts, indices, it, prev):
        seen.append((it, prev is not None))
        return real(discovery, dicts, indices, it, prev)

    monkeypatch.setattr(stage_mod, "discover_sharded", spy)
    res = stage_mod.run_particle(_cfg(out))
    assert seen == [(1, True)], "the resumed run redid iteration 0 or lost its warm-start centroids"
    for key in ("iterations", "final_loss", "loss_per_iteration"):
        assert res["particle"][key] == world["res"]["particle"][key]
    for name in ("iter_1/model_final.pth", "model_final.pth"):
        a, b = _weights(out / name), _weights(world["out"] / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # Training changed the trainable levels and left the frozen stem alone.
    init = stage_mod.build_particle_model(_cfg(out)).backbone_state_dict()
    final = _weights(world["out"] / "model_final.pth")
    assert torch.equal(final["backbone.net._conv_stem.weight"], init["backbone.net._conv_stem.weight"])
    changed = [k for k in final if not torch.equal(final[k], init[k])]
    assert any("._blocks.15." in k for k in changed), "res5 did not train"
    assert not any("_conv_stem" in k or "._blocks.0." in k or "_bn0" in k for k in changed), "stem/res2 moved"


def test_config_change_is_refused(world):
    with pytest.raises(ValueError, match="another PARTICLE/MODEL config"):
        stage_mod.run_particle(_cfg(world["out"], "PARTICLE.TEMPERATURE", "0.2"))


def test_checkpoint_loads_into_mining_features(world):
    ckpt = _weights(world["out"] / "model_final.pth")
    cfg = _cfg(world["out"], "MODEL.WEIGHTS", str(world["out"] / "model_final.pth"))
    cfg.defrost()
    cfg.MINING.FEATURE_LEVELS = ["res2", "res3", "res4"]
    extractor = BackboneFeatures(cfg, kind="hypercolumn")
    state = {f"backbone.{k}": v for k, v in extractor.backbone.state_dict().items()}
    assert state.keys() == ckpt.keys(), "backbone keys missing from (or foreign to) the checkpoint"
    assert all(torch.equal(state[k], ckpt[k]) for k in state)


def _discovery_result(cfg, path=None):
    from part_distill.particle.discovery import discover_sharded
    from detectron2.data import DatasetCatalog
    from detectron2.utils import comm

    model = stage_mod.build_particle_model(cfg)
    disc = stage_mod.build_discovery(cfg, model.encoder.backbone)
    dicts = DatasetCatalog.get("parts_world_train")
    lab0, cen0, _ = discover_sharded(disc, dicts, list(range(len(dicts))), 0)
    lab1, cen1, _ = discover_sharded(disc, dicts, list(range(len(dicts))), 1, cen0)
    out = {"labels": [lab0, lab1], "centers": [cen0, cen1]}
    if path is not None and comm.is_main_process():
        torch.save(out, path)
    return out


def _gloo_worker(ds_root, out_dir, path):
    os.environ["DETECTRON2_DATASETS"] = ds_root
    register_parts_world(SETTINGS)
    _discovery_result(_cfg(out_dir), path)


def test_two_process_gloo_discovery_equals_one_process(world):
    from detectron2.engine import launch

    one = _discovery_result(_cfg(world["out"]))
    path = str(world["tmp"].mktemp("gloo") / "discovery.pt")
    launch(_gloo_worker, 2, dist_url="auto", args=(world["root"], str(world["out"]), path))
    two = torch.load(path, weights_only=False)
    for a, b in zip(one["labels"], two["labels"]):
        assert sorted(a) == sorted(b) == list(range(SETTINGS.num_train))
        assert all(np.array_equal(a[i], b[i]) for i in a)
    for a, b in zip(one["centers"], two["centers"]):
        assert all(torch.allclose(a[i], b[i], atol=1e-6) for i in a)
    # The warm start keeps part ids: with unchanged weights nearly every cell keeps its label from
    # iteration 0 to 1 (a k-means++ restart would relabel the parts at random).
    same = np.mean([np.mean(one["labels"][0][i] == one["labels"][1][i]) for i in one["labels"][0]])
    assert same >= 0.9
