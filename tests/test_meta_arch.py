"""Meta-architectures and their post-processing, on a tiny CPU config."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.structures import Instances

from part_distill.engine.setup import build_cfg
from part_distill.engine.trainer import build_optimizer
from part_distill.modeling.meta_arch import (
    assign_parts_to_objects,
    instance_inference,
    pairwise_mask_iou,
    part_inference,
)

NUM_CLASSES = 3


# ---------------------------------------------------------------- post-processing
def _random_masks(rng, n, h=12, w=10, p=0.3):
    return torch.from_numpy(rng.random((n, h, w)) < p)


def test_eq1_assignment_equals_brute_force_iou_argmax():
    rng = np.random.default_rng(0)
    parts, objects = _random_masks(rng, 30, p=0.15), _random_masks(rng, 5, p=0.4)
    parts[0] = False                      # empty part -> no owner
    parts[1] = objects[2]                 # identical to object 2 -> IoU 1
    objects[4] = objects[3]               # duplicate object: ties go to the lower index
    index, iou = assign_parts_to_objects(parts, objects)
    for i, p in enumerate(parts.numpy()):
        ious = [np.logical_and(p, o).sum() / max(np.logical_or(p, o).sum(), 1) for o in objects.numpy()]
        expected = int(np.argmax(ious)) if max(ious) > 0 else -1
        assert index[i].item() == expected
        assert iou[i].item() == pytest.approx(max(ious), abs=1e-6)
    assert index[0] == -1 and index[1] == 2
    none, _ = assign_parts_to_objects(parts, objects[:0])
    assert (none == -1).all()
    np.testing.assert_allclose(pairwise_mask_iou(parts, objects)[1, 2].item(), 1.0)


def test_instance_inference_equals_loop():
    torch.manual_seed(0)
    logits, masks = torch.randn(6, NUM_CLASSES + 1), torch.randn(6, 8, 9)
    out = instance_inference(logits, masks, top_k=5)
    probs = logits.softmax(-1)[:, :-1]
    cand = []
    for q in range(6):
        b = masks[q] > 0
        quality = (masks[q].sigmoid() * b).sum() / (b.sum() + 1e-6)
        for c in range(NUM_CLASSES):
            cand.append((probs[q, c].item(), (probs[q, c] * quality).item(), q, c))
    top = sorted(cand, reverse=True)[:5]                       # top-k by class prob
    top = sorted(top, key=lambda t: -t[1])                     # then ranked by final score
    assert out.pred_classes.tolist() == [t[3] for t in top]
    np.testing.assert_allclose(out.scores.numpy(), [t[1] for t in top], rtol=1e-5)
    for m, t in zip(out.pred_masks, top):
        assert torch.equal(m, masks[t[2]] > 0)
    assert out.pred_masks.dtype == torch.bool and out.image_size == (8, 9)


def test_part_inference_cluster_slots_of_owner_class():
    torch.manual_seed(1)
    k, n = 2, 7
    logits = torch.randn(n, NUM_CLASSES * k + 1)
    mask_logits = torch.randn(n, 10, 10)
    objects = torch.zeros(2, 10, 10, dtype=torch.bool)
    objects[0, :5], objects[1, 5:] = True, True
    obj_classes = torch.tensor([2, 0])
    feats = torch.randn(n, 4)
    out = part_inference(logits, mask_logits, objects, obj_classes, features=feats, clusters_per_class=k)
    owner, _ = assign_parts_to_objects(mask_logits > 0, objects)
    for i in range(len(out)):
        q = int(torch.nonzero((feats == out.pred_features[i]).all(1))[0])
        o = owner[q].item()
        assert out.object_index[i].item() == o
        b = mask_logits[q] > 0
        quality = (mask_logits[q].sigmoid() * b).sum() / (b.sum() + 1e-6)
        if o < 0:
            assert out.pred_clusters[i] == -1 and out.object_classes[i] == -1
            continue
        c = obj_classes[o].item()
        sliced = torch.cat([logits[q, c * k:(c + 1) * k], logits[q, -1:]]).softmax(0)[:-1]
        assert out.object_classes[i].item() == c
        assert out.pred_clusters[i].item() == int(sliced.argmax())
        assert out.scores[i].item() == pytest.approx((sliced.max() * quality).item(), rel=1e-5)
    assert (out.scores[:-1] >= out.scores[1:]).all()


# ---------------------------------------------------------------- tiny models
def _cfg(meta="InstanceSegmentor", *opts):
    return build_cfg("", [
        "MODEL.META_ARCHITECTURE", meta, "MODEL.DEVICE", "cpu",
        "MODEL.BACKBONE.NAME", "build_efficientnet_lite_backbone", "MODEL.EFFICIENTNET.PRETRAINED", "False",
        "MODEL.PIXEL_MEAN", "[127.5, 127.5, 127.5]", "MODEL.PIXEL_STD", "[127.5, 127.5, 127.5]",
        "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "FPNPixelDecoder", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(NUM_CLASSES),
        "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32", "MODEL.SEM_SEG_HEAD.NORM", "GN",
        "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.NHEADS", "2",
        "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64", "MODEL.MASK_FORMER.DEC_LAYERS", "3",
        "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "6", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256",
        "MODEL.PART_DISTILL.NUM_PART_QUERIES", "8", "MODEL.PART_DISTILL.PART_DEC_LAYERS", "2",
        "TEST.DETECTIONS_PER_IMAGE", "5", "SOLVER.BASE_LR", "0.001", *opts,
    ])


def _inputs(n=2, size=64, with_parts=False):
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        img = (torch.rand(3, size, size, generator=g) * 60).to(torch.uint8)
        masks = torch.zeros(2, size, size, dtype=torch.bool)
        masks[0, 8 + 4 * i:30, 6:28] = True
        masks[1, 36:60, 30 + 3 * i:58] = True
        img[:, masks[0]] += 150
        img[0, masks[1]] += 100
        inst = Instances((size, size), gt_masks=masks, gt_classes=torch.tensor([i % NUM_CLASSES, 2]))
        d = {"image": img, "instances": inst, "height": 80, "width": 96}
        if with_parts:
            halves = masks.clone()
            halves[:, :, size // 2:] = False
            d["parts"] = Instances((size, size), gt_masks=halves, gt_classes=torch.zeros(2, dtype=torch.long))
        out.append(d)
    return out


@pytest.fixture(scope="module")
def instance_model():
    torch.manual_seed(0)
    return build_model(_cfg())


def test_instance_model_train_losses_and_eval_format(instance_model):
    model = instance_model
    model.train()
    losses = model(_inputs())
    # 3 prediction rounds: final + 2 aux, each ce/mask/dice.
    assert len(losses) == 9 and {"loss_ce", "loss_mask_1", "loss_dice_0"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model(_inputs())
    assert len(out) == 2 and set(out[0]) == {"instances"}
    inst = out[0]["instances"]
    assert inst.image_size == (80, 96) and inst.pred_masks.shape[1:] == (80, 96)
    assert inst.pred_masks.dtype == torch.bool and inst.pred_classes.dtype == torch.int64
    assert len(inst) == 5 and (inst.scores[:-1] >= inst.scores[1:]).all()


def _instance_fit(model):
    """Per GT object of ``_inputs``: (best IoU of a predicted instance at output size, is its class right)."""
    model.eval()
    with torch.no_grad():
        outs = model(_inputs())
    model.train()
    fit = []
    for x, o in zip(_inputs(), outs):
        pred = o["instances"]
        gt = F.interpolate(x["instances"].gt_masks[None].float(), size=(80, 96), mode="nearest")[0] > 0.5
        for m, c in zip(gt, x["instances"].gt_classes.tolist()):
            iou = (pred.pred_masks & m).sum((1, 2)).float() / (pred.pred_masks | m).sum((1, 2)).float()
            j = int(iou.argmax())
            fit.append((float(iou[j]), int(pred.pred_classes[j]) == c))
    return fit


def test_two_image_overfit_reduces_loss_and_segments_the_objects():
    torch.manual_seed(0)
    cfg = _cfg("InstanceSegmentor", "SOLVER.CLIP_GRADIENTS.ENABLED", "True",
               "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "1.0")
    model = build_model(cfg)
    model.train()
    # Control: the untrained model's instances miss every object, so the fit below can fail.
    assert all(iou < 0.3 for iou, _ in _instance_fit(model))
    opt = build_optimizer(cfg, model)
    inputs = _inputs()
    history = []
    for _ in range(40):
        loss = sum(model(inputs).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert np.mean(history[-5:]) < 0.6 * np.mean(history[:5])
    fit = _instance_fit(model)
    assert len(fit) == 4 and all(iou > 0.8 and right for iou, right in fit), fit


def _part_model(*opts):
    torch.manual_seed(0)
    return build_model(_cfg("PartDistillationModel", *opts))


@pytest.mark.parametrize("freeze_decoder", [True, False])
def test_freezing_really_freezes(freeze_decoder):
    model = _part_model("MODEL.PART_DISTILL.FREEZE_INSTANCE_DECODER", str(freeze_decoder),
                        "MODEL.EFFICIENTNET.NORM", "BN")
    model.train()
    assert not model.backbone.training and not model.sem_seg_head.pixel_decoder.training
    assert model.sem_seg_head.predictor.training != freeze_decoder and model.part_predictor.training
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(_cfg("PartDistillationModel"), model)
    for _ in range(2):
        losses = model(_inputs(with_parts=True))
        assert any(k.startswith("part_") for k in losses)
        assert any(k.startswith("obj_") for k in losses) == (not freeze_decoder)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    after = model.state_dict()
    for prefix in ("backbone.", "sem_seg_head.pixel_decoder."):
        for k, v in before.items():
            if k.startswith(prefix):
                assert torch.equal(v, after[k]), k   # weights and BN running stats alike
    assert all(not p.requires_grad for p in model.backbone.parameters())
    dec = [k for k in before if k.startswith("sem_seg_head.predictor.") and before[k].is_floating_point()]
    changed = any(not torch.equal(before[k], after[k]) for k in dec)
    assert changed == (not freeze_decoder)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("part_predictor."))


@pytest.mark.parametrize("objects", ["predicted", "gt"])
def test_part_model_eval_format_and_eq1(objects):
    model = _part_model("MODEL.PART_DISTILL.OBJECTS", objects)
    model.eval()
    inputs = _inputs()
    with torch.no_grad():
        out = model(inputs)
    for x, o in zip(inputs, out):
        assert set(o) == {"instances", "parts"}
        parts, inst = o["parts"], o["instances"]
        assert parts.image_size == (80, 96) and parts.pred_masks.shape == (8, 80, 96)
        assert parts.pred_masks.dtype == torch.bool and parts.pred_features.shape == (8, 32)
        for f in ("pred_clusters", "object_index", "object_classes"):
            assert getattr(parts, f).dtype == torch.int64
        assert (parts.pred_clusters == -1).all()  # class-agnostic head
        if objects == "gt":
            owners = torch.nn.functional.interpolate(
                x["instances"].gt_masks[None].float(), size=(80, 96), mode="nearest")[0] > 0.5
            classes = x["instances"].gt_classes
        else:
            owners, classes = inst.pred_masks, inst.pred_classes
        expected, _ = assign_parts_to_objects(parts.pred_masks, owners)
        assert torch.equal(parts.object_index, expected)
        owned = expected >= 0
        assert torch.equal(parts.object_classes[owned], classes[expected[owned]])
        assert (parts.object_classes[~owned] == -1).all()


def test_gt_objects_missing_is_a_clear_error():
    model = _part_model("MODEL.PART_DISTILL.OBJECTS", "gt")
    model.eval()
    x = _inputs(1)[0]
    del x["instances"]
    with pytest.raises(KeyError, match="keep_annotations"), torch.no_grad():
        model([x])


def test_part_inference_with_no_objects_leaves_every_part_unowned():
    # An image where no predicted object passes the score threshold: parts stay, owned by nobody.
    from part_distill.modeling.meta_arch.postprocess import part_inference

    torch.manual_seed(0)
    mask_logits = torch.randn(3, 8, 8)
    no_masks, no_classes = torch.zeros(0, 8, 8, dtype=torch.bool), torch.zeros(0, dtype=torch.long)
    for num_classes in (1, 2 * 4):
        parts = part_inference(torch.randn(3, num_classes + 1), mask_logits, no_masks, no_classes,
                               clusters_per_class=4)
        assert len(parts) == 3
        assert parts.object_index.tolist() == [-1, -1, -1] and parts.object_classes.tolist() == [-1, -1, -1]
        assert parts.pred_clusters.tolist() == [-1, -1, -1]
