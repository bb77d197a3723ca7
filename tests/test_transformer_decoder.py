"""Masked-attention decoder: equality with HF's Mask2Former decoder, attention vs torch, masking, bf16, key names."""
import math

import pytest
import torch
from torch import nn

from detectron2.config import get_cfg

from part_distill.config import add_part_distill_config
from part_distill.modeling.transformer_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
    MaskedAttentionDecoder,
    build_transformer_decoder,
)
from part_distill.modeling.transformer_decoder.layers import CrossAttentionLayer, MultiheadAttention
from part_distill.modeling.transformer_decoder.masked_attention_decoder import attention_mask_from_logits
from part_distill.modeling.pixel_decoder.position_encoding import PositionEmbeddingSine

from _hf_peer import (TOL, hf_config, hf_transformer_module, max_abs_diff, ours_per_round, run_hf_transformer,
                      transformer_module_to_ours)


def tiny_decoder(in_channels=16, num_classes=3, queries=5, layers=4, enforce=False, pre_norm=False):
    return MaskedAttentionDecoder(
        in_channels, num_classes=num_classes, hidden_dim=32, num_queries=queries, nheads=4,
        dim_feedforward=48, dec_layers=layers, pre_norm=pre_norm, mask_dim=8,
        enforce_input_project=enforce,
    )


def tiny_inputs(batch=2, channels=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(batch, channels, s, s + 1, generator=g) for s in (2, 4, 8)]
    mask_features = torch.randn(batch, 8, 16, 18, generator=g)
    return feats, mask_features


@pytest.mark.parametrize("pre_norm", [False, True])
def test_outputs_equal_hf_peer(pre_norm):
    """Every round's class and mask logits and the final query features equal transformers'
    Mask2Former decoder loaded with the same weights (16 -> 32 input projections, non-square maps)."""
    hf, classes = hf_transformer_module(
        hf_config(hidden=32, mask_dim=8, heads=4, queries=5, num_classes=3, dec_layers=4, dec_ffn=48,
                  pre_norm=pre_norm), in_features=16)
    dec = tiny_decoder(pre_norm=pre_norm).eval()
    dec.load_state_dict(transformer_module_to_ours(hf, classes), strict=True)
    feats, mf = tiny_inputs()
    with torch.no_grad():
        out = dec(feats, mf)
    assert out["pred_logits"].shape == (2, 5, 4)
    assert out["pred_masks"].shape == (2, 5, 16, 18)
    assert out["query_features"].shape == (2, 5, 32)
    # One aux output per earlier prediction round: the raw queries + all but the last layer.
    assert len(out["aux_outputs"]) == 4
    ref_logits, ref_masks, ref_queries = run_hf_transformer(hf, classes, feats, mf)
    logits, masks = ours_per_round(out)
    assert max_abs_diff(logits, ref_logits) <= TOL
    assert max_abs_diff(masks, ref_masks) <= TOL
    # query_features: HF's normed final queries (what both heads read), not recomputed from our heads
    assert max_abs_diff(out["query_features"], ref_queries) <= TOL


def test_images_are_independent():
    torch.manual_seed(0)
    dec = tiny_decoder()
    feats, mf = tiny_inputs()
    both = dec(feats, mf)
    first = dec([f[:1] for f in feats], mf[:1])
    torch.testing.assert_close(both["pred_masks"][:1], first["pred_masks"], rtol=1e-4, atol=1e-4)


def test_attention_matches_torch_multihead_attention():
    """Same parameters as nn.MultiheadAttention -> same output, incl. a boolean mask
    (ours: True = attend; torch's: True = blocked)."""
    torch.manual_seed(0)
    ours = MultiheadAttention(32, 4)
    ref = nn.MultiheadAttention(32, 4, batch_first=True)
    assert set(ours.state_dict()) == set(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    allowed = torch.rand(2, 1, 5, 7) > 0.4
    allowed[..., 0] = True  # every query attends at least one key
    ref_mask = (~allowed).expand(2, 4, 5, 7).reshape(8, 5, 7)
    torch.testing.assert_close(ours(q, k, v, allowed), ref(q, k, v, attn_mask=ref_mask)[0])
    torch.testing.assert_close(ours(q, k, v), ref(q, k, v)[0])


def test_attention_mask_threshold_and_empty_fix():
    logits = torch.full((1, 3, 4, 4), -5.0)
    logits[0, 0, :2, :2] = 5.0  # query 0: top-left quarter
    logits[0, 2] = 5.0          # query 2: everything; query 1: nothing
    allowed = attention_mask_from_logits(logits, (4, 4))
    assert allowed.shape == (1, 1, 3, 16) and allowed.dtype == torch.bool
    expected0 = torch.zeros(4, 4, dtype=torch.bool)
    expected0[:2, :2] = True
    assert torch.equal(allowed[0, 0, 0], expected0.flatten())
    assert allowed[0, 0, 1].all(), "a query with an empty mask must attend every key"
    assert allowed[0, 0, 2].all()
    # Resizing: a 4x4 quarter is still a quarter at 2x2.
    small = attention_mask_from_logits(logits, (2, 2))
    assert torch.equal(small[0, 0, 0], torch.tensor([True, False, False, False]))


def test_empty_mask_query_attends_all_keys():
    """Cross-attention of a query whose predicted mask is empty equals unmasked attention,
    while a query with a non-empty mask attends only inside it."""
    torch.manual_seed(0)
    layer = CrossAttentionLayer(32, 4)
    tgt, qpos = torch.randn(1, 2, 32), torch.randn(1, 2, 32)
    mem, mpos = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    logits = torch.full((1, 2, 4, 4), -3.0)
    logits[0, 0, 0, :] = 3.0  # query 0 sees row 0 only; query 1 sees nothing -> everything
    allowed = attention_mask_from_logits(logits, (4, 4))
    masked = layer(tgt, mem, mpos, qpos, allowed)
    unmasked = layer(tgt, mem, mpos, qpos, None)
    torch.testing.assert_close(masked[0, 1], unmasked[0, 1])
    # Query 0 must only depend on keys 0..3: changing the other keys leaves it unchanged.
    mem2 = mem.clone()
    mem2[0, 4:] = torch.randn(12, 32)
    torch.testing.assert_close(layer(tgt, mem2, mpos, qpos, allowed)[0, 0], masked[0, 0])
    assert not torch.allclose(masked[0, 0], unmasked[0, 0])
    assert torch.isfinite(masked).all()


def test_position_encoding_matches_formula():
    pe = PositionEmbeddingSine(4, normalize=True)
    h, w = 3, 5
    pos = pe(torch.zeros(2, 1, h, w))
    assert pos.shape == (2, 8, h, w)
    y, x = 1, 3  # 0-based cell
    ay = (y + 1) / (h + 1e-6) * 2 * math.pi
    ax = (x + 1) / (w + 1e-6) * 2 * math.pi
    freqs = [1.0, 1.0, 10000 ** 0.5, 10000 ** 0.5]  # temperature ** (2 * (i // 2) / 4)
    expected = [math.sin(ay / freqs[0]), math.cos(ay / freqs[1]), math.sin(ay / freqs[2]),
                math.cos(ay / freqs[3]), math.sin(ax / freqs[0]), math.cos(ax / freqs[1]),
                math.sin(ax / freqs[2]), math.cos(ax / freqs[3])]
    torch.testing.assert_close(pos[1, :, y, x], torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    dec = tiny_decoder()
    feats, mf = tiny_inputs()
    ref = dec(feats, mf)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dec(feats, mf)
    assert out["pred_masks"].dtype == torch.bfloat16
    assert torch.isfinite(out["pred_masks"].float()).all()
    # bf16 keeps ~3 significant digits; masked attention may flip borderline pixels, so compare
    # the first prediction round (no masks involved yet) tightly and the rest loosely.
    first, first_ref = out["aux_outputs"][0]["pred_masks"].float(), ref["aux_outputs"][0]["pred_masks"]
    assert (first - first_ref).abs().max() < 0.05 * first_ref.abs().max()
    out["pred_masks"].float().sum().backward()
    assert dec.query_feat.weight.grad is not None and torch.isfinite(dec.query_feat.weight.grad).all()


def official_decoder_keys(num_layers, with_input_proj):
    """State-dict keys of Mask2Former's MultiScaleMaskedTransformerDecoder (checked against
    facebookresearch/Mask2Former mask2former/modeling/transformer_decoder/
    mask2former_transformer_decoder.py): per layer self_attn/multihead_attn (in_proj_*,
    out_proj.*) + norm, FFN linear1/linear2/norm, then decoder_norm, query_feat, query_embed,
    level_embed, input_proj.{0,1,2} (1x1 convs only when needed), class_embed, mask_embed.layers.{0,1,2}."""
    keys = []
    attn = ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    for i in range(num_layers):
        keys += [f"transformer_self_attention_layers.{i}.self_attn.{a}" for a in attn]
        keys += [f"transformer_self_attention_layers.{i}.norm.{p}" for p in ("weight", "bias")]
        keys += [f"transformer_cross_attention_layers.{i}.multihead_attn.{a}" for a in attn]
        keys += [f"transformer_cross_attention_layers.{i}.norm.{p}" for p in ("weight", "bias")]
        keys += [f"transformer_ffn_layers.{i}.{m}.{p}" for m in ("linear1", "linear2", "norm")
                 for p in ("weight", "bias")]
    keys += ["decoder_norm.weight", "decoder_norm.bias", "query_feat.weight", "query_embed.weight",
             "level_embed.weight", "class_embed.weight", "class_embed.bias"]
    keys += [f"mask_embed.layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    if with_input_proj:
        keys += [f"input_proj.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    return set(keys)


def test_from_config_matches_official_r50_layout():
    """Mask2Former COCO instance R50: 100 queries, DEC_LAYERS 10, 80 classes, 256-d pixel decoder."""
    cfg = add_part_distill_config(get_cfg())
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 80
    if not hasattr(cfg.MODEL.SEM_SEG_HEAD, "MASK_DIM"):  # owned by the pixel-decoder config
        cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 256
    dec = build_transformer_decoder(cfg, in_channels=256)
    sd = dec.state_dict()
    assert set(sd) == official_decoder_keys(9, with_input_proj=False)
    assert sd["query_feat.weight"].shape == (100, 256)
    assert sd["class_embed.weight"].shape == (81, 256)
    assert sd["transformer_ffn_layers.0.linear1.weight"].shape == (2048, 256)
    assert sd["transformer_cross_attention_layers.0.multihead_attn.in_proj_weight"].shape == (768, 256)
    # Official YAMLs name Mask2Former's decoder; the alias builds the same module.
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    assert set(build_transformer_decoder(cfg, in_channels=256).state_dict()) == set(sd)
    # The part decoder overrides sizes through keyword arguments.
    part = build_transformer_decoder(cfg, in_channels=128, num_classes=1, num_queries=200)
    psd = part.state_dict()
    assert psd["class_embed.weight"].shape == (2, 256) and psd["query_feat.weight"].shape == (200, 256)
    assert set(psd) == official_decoder_keys(9, with_input_proj=True)
    assert "MaskedAttentionDecoder" in TRANSFORMER_DECODER_REGISTRY


def test_input_projection_enforced():
    dec = tiny_decoder(in_channels=32, enforce=False)
    assert not any(k.startswith("input_proj") for k in dec.state_dict())
    dec = tiny_decoder(in_channels=32, enforce=True)
    assert dec.state_dict()["input_proj.2.weight"].shape == (32, 32, 1, 1)


def test_wrong_number_of_levels_is_rejected():
    dec = tiny_decoder()
    feats, mf = tiny_inputs()
    with pytest.raises(ValueError, match="3 feature levels"):
        dec(feats[:2], mf)
