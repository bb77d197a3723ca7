"""Set criterion: each loss vs a dense/hand computation, deep supervision, and an overfit run."""
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import get_cfg

from part_distill.config import add_part_distill_config
from part_distill.modeling.criterion import SetCriterion
from part_distill.modeling.matcher import HungarianMatcher
from part_distill.modeling.transformer_decoder import MaskedAttentionDecoder


class FixedMatcher(nn.Module):
    """Returns a given assignment, so each loss can be checked in isolation."""

    def __init__(self, indices):
        super().__init__()
        self.indices = indices

    def match_many(self, outputs_list, targets):
        return [self.indices for _ in outputs_list]


class PixelCentreCriterion(SetCriterion):
    """Samples every pixel centre of the prediction grid: the point losses become dense losses."""

    def sample_points(self, pred_masks):
        n, _, h, w = pred_masks.shape
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        coords = torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], dim=1).float()
        return coords[None].expand(n, -1, -1)


def make_criterion(cls=SetCriterion, matcher=None, num_classes=3, eos=0.1, deep=True, num_aux=0, points=64):
    return cls(
        num_classes, matcher=matcher, class_weight=2.0, mask_weight=5.0, dice_weight=5.0,
        eos_coef=eos, num_points=points, oversample_ratio=3.0, importance_sample_ratio=0.75,
        deep_supervision=deep, num_aux_outputs=num_aux,
    )


def problem(seed=0, q=4, h=5, w=6):
    g = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": torch.randn(2, q, 4, generator=g),
               "pred_masks": 2 * torch.randn(2, q, h, w, generator=g)}
    targets = [
        {"labels": torch.tensor([2, 0]), "masks": torch.rand(2, h, w, generator=g) > 0.5},
        {"labels": torch.tensor([1]), "masks": torch.rand(1, h, w, generator=g) > 0.5},
    ]
    indices = [(torch.tensor([3, 1]), torch.tensor([0, 1])), (torch.tensor([0]), torch.tensor([0]))]
    return outputs, targets, indices


def test_loss_labels_equals_hand_computation():
    outputs, targets, indices = problem()
    crit = make_criterion(matcher=FixedMatcher(indices), eos=0.1)
    loss = crit.loss_labels(outputs, targets, indices, num_masks=3.0)["loss_ce"]
    # Query -> class: image 0: q3 -> 2, q1 -> 0, rest no-object (3); image 1: q0 -> 1.
    classes = [[3, 0, 3, 2], [1, 3, 3, 3]]
    logp = torch.log_softmax(outputs["pred_logits"].double(), -1)
    num = den = 0.0
    for b in range(2):
        for q in range(4):
            c = classes[b][q]
            wgt = 0.1 if c == 3 else 1.0
            num += -wgt * logp[b, q, c].item()
            den += wgt
    assert loss.item() == pytest.approx(num / den, rel=1e-6)


def test_mask_losses_equal_dense_computation():
    outputs, targets, indices = problem(seed=1)
    crit = make_criterion(PixelCentreCriterion, matcher=FixedMatcher(indices))
    num_masks = 3.0
    losses = crit.loss_masks(outputs, targets, indices, num_masks)
    pairs = [(0, 3, 0), (0, 1, 1), (1, 0, 0)]  # (image, query, target)
    bce = dice = 0.0
    for b, q, t in pairs:
        x = outputs["pred_masks"][b, q].double().flatten().numpy()
        y = targets[b]["masks"][t].double().flatten().numpy()
        p = 1 / (1 + np.exp(-x))
        bce += -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
        dice += 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
    assert losses["loss_mask"].item() == pytest.approx(bce / num_masks, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(dice / num_masks, rel=1e-5)


def test_uniform_points_estimate_the_dense_loss():
    """With importance sampling off, the random points are uniform: many of them estimate the
    dense loss of a smooth (bilinearly upsampled) mask against a full-resolution target."""
    g = torch.Generator().manual_seed(0)
    logits = F.interpolate(3 * torch.randn(1, 1, 4, 4, generator=g), size=(32, 32), mode="bilinear",
                           align_corners=False)[0]
    target = torch.zeros(1, 32, 32, dtype=torch.bool)
    target[0, 8:24, 4:20] = True
    outputs = {"pred_logits": torch.zeros(1, 1, 2), "pred_masks": logits[None]}
    targets = [{"labels": torch.tensor([0]), "masks": target}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    crit = SetCriterion(1, matcher=FixedMatcher(indices), class_weight=1, mask_weight=1, dice_weight=1,
                        eos_coef=0.1, num_points=40000, oversample_ratio=1.0, importance_sample_ratio=0.0)
    torch.manual_seed(0)
    sampled = crit.loss_masks(outputs, targets, indices, 1.0)["loss_mask"].item()
    dense = F.binary_cross_entropy_with_logits(logits[0], target[0].float()).item()
    assert sampled == pytest.approx(dense, rel=0.03)


def test_targets_of_different_sizes_are_padded_bottom_right():
    outputs, targets, indices = problem(seed=2)
    # Image 1's target covers only the top-left 3x4 of the 5x6 padded frame.
    targets[1]["masks"] = targets[1]["masks"][:, :3, :4]
    crit = make_criterion(PixelCentreCriterion, matcher=FixedMatcher(indices))
    got = crit.loss_masks(outputs, targets, indices, 3.0)
    padded = torch.zeros(1, 5, 6, dtype=torch.bool)
    padded[:, :3, :4] = targets[1]["masks"]
    targets[1]["masks"] = padded
    ref = crit.loss_masks(outputs, targets, indices, 3.0)
    torch.testing.assert_close(got["loss_mask"], ref["loss_mask"])
    torch.testing.assert_close(got["loss_dice"], ref["loss_dice"])


def test_deep_supervision_keys_and_weights():
    outputs, targets, indices = problem()
    aux = [{k: v * (1.5 + i) for k, v in outputs.items()} for i in range(2)]
    full = dict(outputs, aux_outputs=aux)
    crit = make_criterion(PixelCentreCriterion, matcher=FixedMatcher(indices), num_aux=2)
    losses = crit(full, targets)
    assert set(losses) == {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1")}
    assert set(crit.weight_dict) == set(losses)
    # Each aux loss is the loss of that aux prediction alone (deterministic matcher and points).
    for i in range(2):
        alone = crit(aux[i], targets)
        for name in ("ce", "mask", "dice"):
            torch.testing.assert_close(losses[f"loss_{name}_{i}"], alone[f"loss_{name}"])
    assert losses["loss_ce_0"].item() != pytest.approx(losses["loss_ce"].item())
    weighted = crit.weighted(losses)
    assert weighted["loss_ce_1"].item() == pytest.approx(2.0 * losses["loss_ce_1"].item())
    assert weighted["loss_dice_0"].item() == pytest.approx(5.0 * losses["loss_dice_0"].item())
    assert weighted["loss_mask"].item() == pytest.approx(5.0 * losses["loss_mask"].item())
    no_deep = make_criterion(matcher=FixedMatcher(indices), deep=False, num_aux=2)
    assert set(no_deep(full, targets)) == {"loss_ce", "loss_mask", "loss_dice"}
    assert set(no_deep.weight_dict) == {"loss_ce", "loss_mask", "loss_dice"}


def test_batch_without_targets_gives_finite_losses_and_gradients():
    outputs, _, _ = problem()
    outputs = {k: v.clone().requires_grad_() for k, v in outputs.items()}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 5, 6, dtype=torch.bool)}
    crit = make_criterion(matcher=HungarianMatcher(cost_class=1, cost_mask=1, cost_dice=1, num_points=16))
    losses = crit(outputs, [empty, empty])
    assert losses["loss_mask"].item() == 0.0 and losses["loss_dice"].item() == 0.0
    # Everything is trained towards no-object: CE = mean -log p(no-object).
    ref = -torch.log_softmax(outputs["pred_logits"], -1)[..., -1].mean()
    assert losses["loss_ce"].item() == pytest.approx(ref.item(), rel=1e-6)
    sum(losses.values()).backward()
    assert torch.isfinite(outputs["pred_masks"].grad).all()


def test_mismatched_target_raises():
    outputs, targets, _ = problem()
    targets[0]["labels"] = torch.tensor([1])
    crit = make_criterion(matcher=HungarianMatcher(cost_class=1, cost_mask=1, cost_dice=1, num_points=16))
    with pytest.raises(ValueError, match="target 0"):
        crit(outputs, targets)


def test_from_config():
    cfg = add_part_distill_config(get_cfg())
    crit = SetCriterion(cfg, num_classes=1)
    assert crit.num_classes == 1 and crit.empty_weight.tolist() == pytest.approx([1.0, 0.1])
    assert crit.weight_dict["loss_ce"] == 2.0 and crit.weight_dict["loss_dice_8"] == 5.0
    assert len(crit.weight_dict) == 3 * 10
    assert crit.num_points == 12544 and crit.matcher.num_points == 12544


class TinyEncoder(nn.Module):
    """Stand-in for backbone + pixel decoder: stride-4 mask features and 3 coarser levels."""

    def __init__(self, ch=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, ch, 3, 2, 1), nn.ReLU(), nn.Conv2d(ch, ch, 3, 2, 1), nn.ReLU())
        self.mask = nn.Conv2d(ch, ch, 3, padding=1)
        self.levels = nn.ModuleList(nn.Conv2d(ch, ch, 1) for _ in range(3))

    def forward(self, images):
        x = self.stem(images)
        multi = [lvl(F.avg_pool2d(x, s)) for lvl, s in zip(self.levels, (8, 4, 2))]
        return self.mask(x), multi


def two_images():
    """Two 64x64 images of coloured rectangles; each rectangle is one target of its colour class."""
    images = torch.zeros(2, 3, 64, 64)
    boxes = [[(0, 4, 30, 8, 40), (1, 36, 60, 30, 60)], [(2, 10, 50, 4, 24), (0, 40, 60, 40, 62)]]
    targets = []
    for b, objs in enumerate(boxes):
        masks = torch.zeros(len(objs), 64, 64, dtype=torch.bool)
        for i, (c, y0, y1, x0, x1) in enumerate(objs):
            images[b, c, y0:y1, x0:x1] = 1.0
            masks[i, y0:y1, x0:x1] = True
        targets.append({"labels": torch.tensor([o[0] for o in objs]), "masks": masks})
    return images, targets


@pytest.fixture
def single_thread():
    """Tiny tensors: intra-op threading only adds overhead (and contention on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_decoder_and_criterion_overfit_two_images(single_thread):
    torch.manual_seed(0)
    encoder = TinyEncoder()
    decoder = MaskedAttentionDecoder(16, num_classes=3, hidden_dim=32, num_queries=6, nheads=4,
                                     dim_feedforward=64, dec_layers=3, pre_norm=False, mask_dim=16,
                                     enforce_input_project=False)
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=256)
    crit = make_criterion(matcher=matcher, num_aux=3, points=256)
    params = list(encoder.parameters()) + list(decoder.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    images, targets = two_images()
    history = []
    for _ in range(50):
        mask_features, multi = encoder(images)
        losses = crit.weighted(crit(decoder(multi, mask_features), targets))
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
    assert all(math.isfinite(v) for v in history)
    start, end = history[0], float(np.mean(history[-5:]))
    print(f"overfit: loss {start:.3f} -> {end:.3f}")
    assert end < 0.5 * start, f"loss {start:.3f} -> {end:.3f}"
    # The final prediction really segments the rectangles: matched masks have high IoU.
    with torch.no_grad():
        mask_features, multi = encoder(images)
        out = decoder(multi, mask_features)
        indices = matcher(out, targets)
    for b, (rows, cols) in enumerate(indices):
        pred = F.interpolate(out["pred_masks"][b : b + 1, rows], size=(64, 64), mode="bilinear") > 0
        gt = targets[b]["masks"][cols]
        iou = (pred[0] & gt).sum((1, 2)).float() / (pred[0] | gt).sum((1, 2)).float()
        assert (iou > 0.5).all(), iou
