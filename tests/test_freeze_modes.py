"""MODEL.PART_DISTILL.FREEZE: which parameters train in each mode, the part branch's initialisation
from the teacher's pixel decoder, and that D^o's features never move in "part_branch" mode."""
import pytest
import torch

import part_distill  # noqa: F401  (registers datasets and models)
from part_distill.engine.trainer import PartDistillTrainer
from part_distill.modeling.checkpoint import PartDistillCheckpointer
from test_self_training import tiny_cfg


def _build(tmp_path, mode, *opts):
    torch.manual_seed(0)
    return PartDistillTrainer.build_model(tiny_cfg(tmp_path, "MODEL.PART_DISTILL.FREEZE", mode, *opts))


@pytest.mark.parametrize("mode,expected", [
    ("encoder", {"part_predictor"}),
    ("reference", {"part_predictor", "sem_seg_head.pixel_decoder"}),
    ("part_branch", {"part_predictor", "part_pixel_decoder"}),
    ("none", {"part_predictor", "sem_seg_head.pixel_decoder", "backbone.net"}),
])
def test_trainable_parameters_per_mode(tmp_path, mode, expected):
    model = _build(tmp_path, mode)
    top = {n.split(".")[0] if not n.startswith(("sem_seg_head.", "backbone.")) else ".".join(n.split(".")[:2])
           for n, p in model.named_parameters() if p.requires_grad}
    assert top == expected
    model.train()
    assert all(not m.training for m in model.frozen_modules())


def test_reference_mode_freezes_only_the_deformable_encoder(tmp_path):
    model = _build(tmp_path, "reference", "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "MSDeformAttnPixelDecoder",
                   "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1", "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_NHEADS", "2",
                   "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_DIM_FEEDFORWARD", "32")
    pd = {n: p.requires_grad for n, p in model.sem_seg_head.pixel_decoder.named_parameters()}
    assert pd and not any(v for n, v in pd.items() if "encoder" in n)
    # As the reference's FREEZE_KEYS: input projections, FPN convs and mask features train.
    for key in ("input_proj.0.0.weight", "adapter_1.weight", "layer_1.weight", "mask_features.weight"):
        assert pd[key], key
    assert any("encoder" in n for n in pd)


def test_part_branch_starts_from_the_teacher_and_keeps_its_own_weights(tmp_path):
    teacher = _build(tmp_path, "encoder")
    torch.nn.init.normal_(teacher.sem_seg_head.pixel_decoder.mask_features.weight)
    path = str(tmp_path / "teacher.pth")
    # An instance teacher's checkpoint: no part_* keys at all.
    torch.save({"model": {k: v for k, v in teacher.state_dict().items() if not k.startswith("part_")}}, path)
    model = _build(tmp_path, "part_branch")
    PartDistillCheckpointer(model).load(path)
    src = model.sem_seg_head.pixel_decoder.state_dict()
    for k, v in model.part_pixel_decoder.state_dict().items():
        assert torch.equal(v, src[k]), k
    assert torch.equal(model.sem_seg_head.pixel_decoder.mask_features.weight,
                       teacher.sem_seg_head.pixel_decoder.mask_features.weight)
    # A part model's own checkpoint keeps its trained branch (not overwritten by the teacher's).
    with torch.no_grad():
        model.part_pixel_decoder.mask_features.weight.add_(1.0)
    own = str(tmp_path / "part.pth")
    torch.save({"model": model.state_dict()}, own)
    again = _build(tmp_path, "part_branch")
    PartDistillCheckpointer(again).load(own)
    assert torch.equal(again.part_pixel_decoder.mask_features.weight, model.part_pixel_decoder.mask_features.weight)
    assert not torch.equal(again.part_pixel_decoder.mask_features.weight,
                           again.sem_seg_head.pixel_decoder.mask_features.weight)


def test_part_branch_training_moves_part_features_not_object_features(tmp_path):
    model = _build(tmp_path, "part_branch")
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    before = model.encode_for_parts(x)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    feats = model.encode_for_parts(x, with_objects=False)
    assert feats.mask_features is None  # a frozen D^o needs no teacher pass while D^p trains
    out = model.predict_parts(feats)
    (out["pred_masks"].square().mean() + feats.part_mask_features.square().mean()).backward()
    opt.step()
    model.eval()
    after = model.encode_for_parts(x)
    assert torch.equal(after.mask_features, before.mask_features)
    assert all(torch.equal(a, b) for a, b in zip(after.multi_scale, before.multi_scale))
    assert not torch.allclose(after.part_mask_features, before.part_mask_features)


def test_unknown_freeze_mode_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="MODEL.PART_DISTILL.FREEZE"):
        _build(tmp_path, "backbone_only")
