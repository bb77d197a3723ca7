"""Object-centric crops (modeling/object_crops.py): boxes, crops and pastes against brute force, and a
crop-mode part model that trains on crops and returns parts inside their owner objects."""
import numpy as np
import pytest
import torch

import part_distill  # noqa: F401  (registers datasets and models)
from detectron2.structures import BitMasks, Instances
from part_distill.engine.trainer import PartDistillTrainer
from part_distill.modeling.object_crops import (OUTSIDE_LOGIT, CropSettings, crop_regions, mask_boxes, paste_regions,
                                               square_boxes)
from test_self_training import tiny_cfg


def test_mask_boxes_match_numpy():
    rng = np.random.default_rng(0)
    masks = rng.random((5, 17, 23)) > 0.97
    masks[3] = False
    boxes = mask_boxes(torch.from_numpy(masks)).numpy()
    for m, b in zip(masks, boxes):
        if not m.any():
            assert (b == 0).all()
            continue
        ys, xs = np.nonzero(m)
        assert b.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_square_boxes_hand_computed():
    b = torch.tensor([[10.0, 20.0, 30.0, 30.0]])  # 20 x 10, centre (20, 25)
    assert square_boxes(b, 1.5).tolist() == [[5.0, 10.0, 35.0, 40.0]]
    s = square_boxes(b, 1.0, scale=torch.tensor([2.0]), shift=torch.tensor([[0.25, 0.0]]))
    assert s.tolist() == [[10.0, 5.0, 50.0, 45.0]]  # side 40, centre moved by 10 px in x


def test_integer_crop_is_a_slice_and_paste_inverts_it():
    img = torch.arange(2 * 3 * 20 * 30, dtype=torch.float32).view(2, 3, 20, 30)
    boxes = torch.tensor([[4.0, 2.0, 12.0, 10.0], [10.0, 5.0, 18.0, 13.0]])
    crops = crop_regions(img, boxes, 8, batch_index=torch.tensor([0, 1]))
    assert torch.allclose(crops[0], img[0, :, 2:10, 4:12])
    assert torch.allclose(crops[1], img[1, :, 5:13, 10:18])
    pasted = paste_regions(crops, boxes, (20, 30))
    assert torch.allclose(pasted[0][:, 2:10, 4:12], img[0, :, 2:10, 4:12])
    outside = torch.ones(20, 30, dtype=torch.bool)
    outside[2:10, 4:12] = False
    assert (pasted[0][:, outside] == OUTSIDE_LOGIT).all()


def test_crop_outside_the_image_reads_zeros():
    img = torch.ones(1, 1, 10, 10)
    crop = crop_regions(img, torch.tensor([[-5.0, -5.0, 5.0, 5.0]]), 10)
    assert crop[0, 0, :5, :5].abs().max() == 0 and torch.allclose(crop[0, 0, 5:, 5:], torch.ones(5, 5))


def test_bad_crop_settings_are_rejected():
    with pytest.raises(ValueError, match="OBJECT_CROP"):
        CropSettings(size=0)
    with pytest.raises(ValueError, match="OBJECT_CROP"):
        CropSettings(scale_jitter=0.5)


def _crop_model(tmp_path, *opts):
    torch.manual_seed(0)
    cfg = tiny_cfg(tmp_path, "MODEL.PART_DISTILL.OBJECT_CROP.ENABLED", "True", "MODEL.PART_DISTILL.OBJECT_CROP.SIZE",
                   "64", "MODEL.PART_DISTILL.OBJECTS", "gt", *opts)
    return PartDistillTrainer.build_model(cfg)


def _input(with_parts=True):
    obj = torch.zeros(2, 64, 64, dtype=torch.bool)
    obj[0, 8:30, 8:40] = True
    obj[1, 40:60, 30:60] = True
    x = {"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8), "height": 64, "width": 64}
    inst = Instances((64, 64))
    inst.gt_masks = BitMasks(obj)
    inst.gt_classes = torch.tensor([1, 2])
    x["instances"] = inst
    if with_parts:
        parts = Instances((64, 64))
        pm = torch.zeros(3, 64, 64, dtype=torch.bool)
        pm[0, 8:30, 8:20] = True
        pm[1, 8:30, 20:40] = True
        pm[2, 40:60, 30:60] = True
        parts.gt_masks = BitMasks(pm)
        parts.gt_classes = torch.zeros(3, dtype=torch.int64)
        parts.object_ids = torch.tensor([7, 7, 9])
        objs = Instances((64, 64))
        objs.gt_masks = BitMasks(obj)
        objs.gt_classes = torch.tensor([1, 2])
        objs.object_ids = torch.tensor([7, 9])
        x["parts"], x["part_objects"] = parts, objs
    return x


def test_crop_model_trains_on_crops_and_keeps_parts_in_their_owner(tmp_path):
    model = _crop_model(tmp_path)
    model.train()
    losses = model([_input()])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.part_predictor.class_embed.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model([_input(with_parts=False)])[0]
    parts = out["parts"]
    obj = _input(with_parts=False)["instances"].gt_masks.tensor
    queries = model.part_predictor.query_feat.num_embeddings
    assert len(parts) <= 2 * queries
    # Clipped to the owner: every predicted pixel lies inside the object it was cropped for.
    for m, j in zip(parts.pred_masks, parts.object_index):
        if m.any():
            assert j >= 0 and not (m & ~obj[j]).any()


def _padded_slice(t, x0, y0, side):
    """t[..., y0:y0 + side, x0:x0 + side] of a [..., H, W] tensor, zeros where the window leaves it."""
    h, w = t.shape[-2:]
    out = t.new_zeros(t.shape[:-2] + (side, side))
    ys, xs = slice(max(y0, 0), min(y0 + side, h)), slice(max(x0, 0), min(x0 + side, w))
    out[..., ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0] = t[..., ys, xs]
    return out


def test_crop_training_feeds_each_owner_crop_and_its_own_parts_cropped_alike(tmp_path, monkeypatch):
    from part_distill.modeling.criterion import SetCriterion

    # Both objects are 32 px wide: with CONTEXT 2 and no jitter each crop is a 64 px window at an
    # integer offset, i.e. a plain (zero-padded) slice of the image and of the part masks.
    model = _crop_model(tmp_path, "MODEL.PART_DISTILL.OBJECT_CROP.CONTEXT", "2.0",
                        "MODEL.PART_DISTILL.OBJECT_CROP.SCALE_JITTER", "1.0",
                        "MODEL.PART_DISTILL.OBJECT_CROP.SHIFT_JITTER", "0.0").train()
    obj = torch.zeros(2, 64, 64, dtype=torch.bool)
    obj[0, 8:30, 8:40] = True  # centre (24, 19): window x -8..56, y -13..51
    obj[1, 36:60, 28:60] = True  # centre (44, 48): window x 12..76, y 16..80
    pm = torch.zeros(3, 64, 64, dtype=torch.bool)
    pm[0, 8:30, 8:24] = True
    pm[1, 8:30, 24:40] = True
    pm[2, 36:48, 28:60] = True
    image = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = {"image": image, "height": 64, "width": 64,
         "instances": Instances((64, 64), gt_masks=BitMasks(obj), gt_classes=torch.tensor([1, 2])),
         "parts": Instances((64, 64), gt_masks=BitMasks(pm), gt_classes=torch.zeros(3, dtype=torch.int64),
                            object_ids=torch.tensor([7, 7, 9])),
         "part_objects": Instances((64, 64), gt_masks=BitMasks(obj), gt_classes=torch.tensor([1, 2]),
                                   object_ids=torch.tensor([7, 9]))}
    crops, targets = [], []
    real_encode, real_criterion = model.encode_for_parts, SetCriterion.forward

    def encode(images, *args, **kwargs):
        crops.append(images.detach().clone())
        return real_encode(images, *args, **kwargs)

    def criterion(self, outputs, t):
        targets.extend(t)
        return real_criterion(self, outputs, t)

    monkeypatch.setattr(model, "encode_for_parts", encode)
    monkeypatch.setattr(SetCriterion, "forward", criterion)
    model([x])
    normalised = (image.float() - 127.5) / 127.5
    windows = {0: (-8, -13), 1: (12, 16)}
    expected = {j: (_padded_slice(normalised, *windows[j], 64), _padded_slice(pm[parts], *windows[j], 64))
                for j, parts in ((0, [0, 1]), (1, [2]))}
    [batch] = crops
    assert batch.shape == (2, 3, 64, 64) and len(targets) == 2
    for crop, target in zip(batch, targets):
        [j] = [j for j, (im, _) in expected.items() if torch.allclose(crop, im, atol=1e-5)]
        assert torch.equal(target["masks"], expected[j][1]), j
        assert target["labels"].tolist() == [0] * len(expected[j][1])


def test_crop_training_needs_the_part_owners(tmp_path):
    model = _crop_model(tmp_path)
    x = _input()
    del x["part_objects"]
    with pytest.raises(KeyError, match="part_objects"):
        model.train()([x])


def test_crop_model_refuses_a_training_instance_decoder(tmp_path):
    with pytest.raises(ValueError, match="FREEZE_INSTANCE_DECODER"):
        _crop_model(tmp_path, "MODEL.PART_DISTILL.FREEZE_INSTANCE_DECODER", "False")
