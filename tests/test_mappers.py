"""Dataset mappers: masks follow the image through flip / ResizeScale / FixedSizeCrop exactly."""
import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from PIL import Image

from part_distill.data.mappers import (
    InstanceLSJMapper,
    PartTargetLSJMapper,
    build_lsj_augmentation,
)
from part_distill.utils.masks import encode_rle


def _world(tmp_path, size=64):
    """A 64x64 RGB image and two RLE objects: a box and a disc, plus a crowd annotation."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    box = (yy >= 5) & (yy < 30) & (xx >= 3) & (xx < 20)
    disc = (yy - 40) ** 2 + (xx - 45) ** 2 < 12 ** 2
    path = tmp_path / "img.png"
    Image.fromarray(image).save(path)
    anns = [
        {"segmentation": encode_rle(box), "category_id": 2, "iscrowd": 0, "cluster": 5},
        {"segmentation": encode_rle(disc), "category_id": 4, "iscrowd": 0, "cluster": 1},
    ]
    d = {"file_name": str(path), "height": size, "width": size, "image_id": 1, "annotations": anns}
    return d, image, [box, disc]


def _upsample2(a):
    return np.repeat(np.repeat(a, 2, axis=0), 2, axis=1)


def test_resize_and_pad_match_direct_computation(tmp_path):
    d, image, masks = _world(tmp_path)
    # Scale fixed to 0.5 of 256 -> exact 2x upsampling of the 64px image, then pad to 256.
    mapper = InstanceLSJMapper(True, augmentations=build_lsj_augmentation(256, 0.5, 0.5, flip=""),
                               image_format="RGB")
    out = mapper(d)
    inst = out["instances"]
    assert out["image"].shape == (3, 256, 256)
    assert inst.gt_classes.tolist() == [2, 4]
    got = inst.gt_masks.tensor.numpy()
    for m, g in zip(masks, got):
        expected = np.zeros((256, 256), bool)
        expected[:128, :128] = _upsample2(m)
        np.testing.assert_array_equal(g, expected)
    # Padding is grey in the image and background (not 255 = foreground) in the masks.
    assert (out["image"][:, 128:, :] == 128).all() and (out["image"][:, :, 128:] == 128).all()
    expected_img = np.asarray(Image.fromarray(image).resize((128, 128), Image.BILINEAR))
    np.testing.assert_array_equal(out["image"][:, :128, :128].permute(1, 2, 0).numpy(), expected_img)


def test_flip_resize_crop_keep_masks_aligned_with_image(tmp_path):
    d, image, masks = _world(tmp_path)
    augs = [T.RandomFlip(prob=1.0), T.ResizeScale(2.0, 2.0, 64, 64), T.FixedSizeCrop((64, 64), seg_pad_value=0)]
    mapper = InstanceLSJMapper(True, augmentations=augs, image_format="RGB")
    big_img = np.asarray(Image.fromarray(image[:, ::-1].copy()).resize((128, 128), Image.BILINEAR))
    np.random.seed(3)
    for _ in range(3):
        out = mapper(d)
        img = out["image"].permute(1, 2, 0).numpy()
        # Recover the random crop offset from the image alone, by exhaustive search.
        offsets = [(y, x) for y in range(65) for x in range(65)
                   if np.array_equal(big_img[y:y + 64, x:x + 64], img)]
        assert len(offsets) == 1
        y, x = offsets[0]
        got = out["instances"].gt_masks.tensor.numpy()
        expected = [_upsample2(m[:, ::-1])[y:y + 64, x:x + 64] for m in masks]
        expected = [e for e in expected if e.any()]
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            np.testing.assert_array_equal(g, e)


def test_lsj_augmentation_from_config_keys():
    augs = build_lsj_augmentation(192, 0.1, 2.0, flip="horizontal")
    assert [type(a) for a in augs] == [T.RandomFlip, T.ResizeScale, T.FixedSizeCrop]
    assert augs[1].min_scale == 0.1 and augs[1].max_scale == 2.0 and augs[1].target_height == 192
    assert augs[2].crop_size == (192, 192) and augs[2].seg_pad_value == 0
    with pytest.raises(ValueError, match="RANDOM_FLIP"):
        build_lsj_augmentation(192, 0.1, 2.0, flip="diagonal")


def test_crowd_dropped_in_training_kept_at_test(tmp_path):
    d, _, masks = _world(tmp_path)
    d["annotations"].append({"segmentation": encode_rle(masks[0]), "category_id": 1, "iscrowd": 1})
    train = InstanceLSJMapper(True, augmentations=[], image_format="RGB")(d)
    assert train["instances"].gt_classes.tolist() == [2, 4]
    test = InstanceLSJMapper(False, augmentations=[], image_format="RGB", keep_annotations=True)(d)
    # Test-time rows stay aligned with the annotation list (object_index of "gt" objects).
    assert test["instances"].gt_classes.tolist() == [2, 4, 1]
    assert "instances" not in InstanceLSJMapper(False, augmentations=[], image_format="RGB")(d)


def test_part_target_mapper_single_class_and_class_key(tmp_path):
    d, _, masks = _world(tmp_path)
    out = PartTargetLSJMapper(True, augmentations=[], image_format="RGB")(d)
    assert "instances" not in out
    assert out["parts"].gt_classes.tolist() == [0, 0]
    assert torch.equal(out["parts"].gt_masks.tensor, torch.from_numpy(np.stack(masks)))
    out = PartTargetLSJMapper(True, augmentations=[], image_format="RGB", class_key="cluster")(d)
    assert out["parts"].gt_classes.tolist() == [5, 1]
    with pytest.raises(KeyError, match="PART_CLASS_KEY"):
        PartTargetLSJMapper(True, augmentations=[], image_format="RGB", class_key="nope")(d)
