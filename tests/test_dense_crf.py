"""Dense-CRF refinement: cleans block-shaped noisy part maps, stays inside the mask, pool == in-process."""
import numpy as np
import pytest

from part_distill.mining.dense_crf import DenseCRFRefiner, refine_part_labels


def _two_colour_scene(seed, h=64, w=96, split=45):
    """Red left / blue right image with a noisy, blocky (feature-grid-like) label map of it."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.int64)
    img[:, :split] = (200, 40, 40)
    img[:, split:] = (40, 40, 200)
    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    gt = np.zeros((h, w), np.int64)
    gt[:, split:] = 1
    mask = np.zeros((h, w), bool)
    mask[6 : h - 6, 8 : w - 8] = True
    # k-means at 1/8 resolution: part boundaries snap to the 8-pixel grid, then salt noise.
    noisy = np.zeros((h, w), np.int64)
    noisy[:, (split // 8 + 1) * 8 - 8 * (seed % 2) :] = 1
    flip = rng.random((h, w)) < 0.2
    noisy[flip] = 1 - noisy[flip]
    noisy[~mask] = -1
    return img, gt, mask, noisy


@pytest.mark.parametrize("seed", [0, 1])
def test_crf_cleans_noisy_labels_especially_at_the_boundary(seed):
    img, gt, mask, noisy = _two_colour_scene(seed)
    out = refine_part_labels(img, noisy, mask)
    band = mask & (np.abs(np.arange(gt.shape[1]) - 45) <= 6)[None, :]
    acc = lambda m, region: (m[region] == gt[region]).mean()  # noqa: E731
    assert acc(out, mask) > 0.97 > acc(noisy, mask) + 0.1
    assert acc(out, band) > 0.9 > acc(noisy, band) + 0.15
    assert (out[~mask] == -1).all()


def test_crf_never_labels_outside_mask_and_keeps_single_label_maps():
    img, _, mask, noisy = _two_colour_scene(0)
    ring = np.zeros_like(mask)
    ring[20:40, 30:60] = True
    out = refine_part_labels(img, np.where(ring, noisy, -1), ring)
    assert set(np.unique(out[ring])) <= {0, 1} and (out[~ring] == -1).all()
    single = np.where(mask, 0, -1)
    np.testing.assert_array_equal(refine_part_labels(img, single, mask), single)


def test_crf_rejects_bad_input():
    img, _, mask, noisy = _two_colour_scene(0)
    with pytest.raises(ValueError, match="uint8"):
        refine_part_labels(img.astype(np.float32), noisy, mask)
    with pytest.raises(ValueError, match="num_labels"):
        refine_part_labels(img, noisy, mask, num_labels=1)


def test_worker_pool_equals_in_process():
    jobs = []
    for seed in range(4):
        img, _, mask, noisy = _two_colour_scene(seed)
        jobs.append((img, noisy, mask))
    jobs.append((img, noisy, mask, 3))
    serial = DenseCRFRefiner(num_workers=0).refine_many(jobs)
    with DenseCRFRefiner(num_workers=2) as crf:
        pooled = crf.refine_many(jobs)
        assert crf._pool is not None
    assert crf._pool is None  # shut down on exit
    assert len(pooled) == len(jobs)
    for a, b in zip(serial, pooled):
        np.testing.assert_array_equal(a, b)


def test_refiner_reads_design_defaults_from_cfg():
    from detectron2.config import get_cfg

    from part_distill.config import add_part_distill_config

    cfg = add_part_distill_config(get_cfg())
    crf = DenseCRFRefiner(cfg)
    assert crf.params == dict(
        gt_prob=0.7, num_iters=10, gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=20.0,
        bilateral_srgb=13.0, bilateral_compat=10.0, crop_margin=8,
    )
    assert crf.num_workers == cfg.MINING.CRF.NUM_WORKERS
