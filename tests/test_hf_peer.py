"""Numerical equivalence with Hugging Face transformers' Mask2Former (an independent implementation).

HF modules get random weights; ``part_distill.modeling.hf_import`` renames their state dict to the
original Mask2Former names, which load strictly into our modules; both then run on the same inputs
(fp32, CPU, tiny sizes, non-square maps) and must agree within ``TOL`` = 1e-4 abs on: the pixel
decoder's mask features and 3 multi-scale features, the masked-attention decoder's class and mask
logits of every prediction round, its final normed queries, and (with a Swin backbone, through a
``save_pretrained`` folder and our checkpointer) the whole forward pass. Measured: <= 4e-6.

Differences by design, not compared:
* padding masks: HF's pixel decoder builds all-False masks (valid ratio 1) and its decoder takes
  none; ours has no padding mask (inputs are unpadded) -- so only unpadded inputs are compared;
* attention-mask convention: HF adds a float mask from ``sigmoid < 0.5`` (True = blocked, a row
  that blocks everything is cleared); ours passes SDPA a bool mask (True = may attend, an empty row
  attends everything). Not compared tensor by tensor: equal logits after 3 masked rounds, with about
  half of every mask blocked (checked), show the two rules agree;
* HF hard-codes 3 levels and 4 sampling points in the deformable encoder, so those are fixed here;
* query init: both learn ``query_feat`` + ``query_embed``; the initial values differ (HF: N(0, 1))
  but are loaded, so they do not matter.

The mutation tests show the comparison is not vacuous: a swapped weight, a dropped scale or a
transposed projection in the converted weights (or a missing 1/sqrt(d) scale in our attention)
moves the outputs by far more than TOL.
"""
import torch
import pytest
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model

from _hf_peer import (TOL, hf_config, hf_pixel_decoder, hf_transformer_module, max_abs_diff, ours_per_round,
                      pixel_decoder_to_ours, randomize_, run_hf_pixel_decoder, run_hf_transformer,
                      transformer_module_to_ours)
from part_distill.engine.setup import build_cfg
from part_distill.modeling.checkpoint import PartDistillCheckpointer
from part_distill.modeling.hf_import import convert_hf_mask2former_state_dict
from part_distill.modeling.pixel_decoder import MSDeformAttnPixelDecoder
from part_distill.modeling.transformer_decoder import MaskedAttentionDecoder
from part_distill.modeling.transformer_decoder import layers as decoder_layers

transformers = pytest.importorskip("transformers")

CHANNELS = {"res2": 16, "res3": 24, "res4": 32, "res5": 40}
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
HEIGHT, WIDTH = 64, 96  # non-square: a swapped (h, w) anywhere shows


def backbone_features(seed=1, batch=2):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(batch, c, HEIGHT // STRIDES[k], WIDTH // STRIDES[k], generator=g)
            for k, c in CHANNELS.items()}


def our_pixel_decoder(state=None):
    pd = MSDeformAttnPixelDecoder({k: ShapeSpec(channels=c, stride=STRIDES[k]) for k, c in CHANNELS.items()},
                                  conv_dim=32, mask_dim=32, transformer_enc_layers=2, transformer_nheads=4,
                                  transformer_dim_feedforward=48, transformer_n_points=4).eval()
    if state is not None:
        pd.load_state_dict(state, strict=True)
    return pd


def our_decoder(in_channels=32, pre_norm=False, enforce=False, state=None):
    dec = MaskedAttentionDecoder(in_channels, num_classes=3, hidden_dim=32, num_queries=8, nheads=4,
                                 dim_feedforward=48, dec_layers=3, pre_norm=pre_norm, mask_dim=32,
                                 enforce_input_project=enforce).eval()
    if state is not None:
        dec.load_state_dict(state, strict=True)
    return dec


def test_pixel_decoder_equals_hf():
    hf = hf_pixel_decoder(hf_config(), [CHANNELS[k] for k in sorted(CHANNELS)])
    ours = our_pixel_decoder(pixel_decoder_to_ours(hf))
    feats = backbone_features()
    hf_mask, hf_multi = run_hf_pixel_decoder(hf, feats)
    with torch.no_grad():
        mask, encoder_out, multi = ours.forward_features(feats)
    assert [tuple(t.shape[-2:]) for t in multi] == [(2, 3), (4, 6), (8, 12)] and mask.shape[-2:] == (16, 24)
    assert max_abs_diff(mask, hf_mask) <= TOL
    assert max_abs_diff(multi, hf_multi) <= TOL
    assert max_abs_diff(encoder_out, hf_multi[0]) <= TOL  # the encoder's coarsest level
    assert float(mask.abs().max()) > 0.5  # not a comparison of near-zeros


@pytest.mark.parametrize("pre_norm", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("in_channels, enforce", [(32, False), (32, True), (24, False)],
                         ids=["no_input_proj", "enforced_input_proj", "input_proj"])
def test_transformer_decoder_equals_hf(pre_norm, in_channels, enforce):
    hf, classes = hf_transformer_module(hf_config(pre_norm=pre_norm, enforce_input_projection=enforce), in_channels)
    ours = our_decoder(in_channels, pre_norm, enforce, transformer_module_to_ours(hf, classes))
    g = torch.Generator().manual_seed(2)
    multi = [torch.randn(2, in_channels, s, s + 1, generator=g) for s in (2, 4, 8)]
    mask_features = torch.randn(2, 32, 16, 18, generator=g)
    hf_logits, hf_masks, hf_queries = run_hf_transformer(hf, classes, multi, mask_features)
    with torch.no_grad():
        out = ours(multi, mask_features)
    logits, masks = ours_per_round(out)
    assert len(logits) == len(hf_logits) == 4  # the learned queries + 3 layers
    assert max_abs_diff(logits, hf_logits) <= TOL
    assert max_abs_diff(masks, hf_masks) <= TOL
    # query_features (the paper's f^p) are HF's normed final queries, the input of both heads
    assert max_abs_diff(out["query_features"], hf_queries) <= TOL
    for m in hf_masks[:-1]:  # the masks that gate the next round block a real share of the keys
        assert 0.2 < float((m.sigmoid() < 0.5).float().mean()) < 0.8


# ---------------------------------------------------------------- whole model through the checkpointer
SWIN_OPTS = [
    "MODEL.DEVICE", "cpu", "MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]",
    "MODEL.SWIN.NUM_HEADS", "[1, 2, 2, 4]", "MODEL.SWIN.WINDOW_SIZE", "4", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "2", "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_NHEADS", "4",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_DIM_FEEDFORWARD", "48", "MODEL.MASK_FORMER.HIDDEN_DIM", "32",
    "MODEL.MASK_FORMER.NHEADS", "4", "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "48", "MODEL.MASK_FORMER.DEC_LAYERS", "4",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8",
]


def tiny_hf_swin_model():
    swin = transformers.SwinConfig(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=4,
                                   drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3", "stage4"])
    torch.manual_seed(0)
    return randomize_(transformers.Mask2FormerForUniversalSegmentation(hf_config(backbone_config=swin)), seed=3)


@pytest.mark.parametrize("form", ["folder", "safetensors", "torch_save"])
def test_hf_weights_load_into_our_model_and_match(tmp_path, form):
    """A user's HF Mask2Former (Swin) as MODEL.WEIGHTS -- a save_pretrained folder, its safetensors file
    or a torch.save of its state dict: every key lands, the whole forward pass agrees."""
    hf = tiny_hf_swin_model()
    hf.save_pretrained(tmp_path)
    weights = {"folder": tmp_path, "safetensors": tmp_path / "model.safetensors", "torch_save": tmp_path / "hf.pth"}
    if form == "torch_save":
        torch.save(hf.state_dict(), weights[form])
    cfg = build_cfg("configs/mask2former_compat/maskformer2_swinL_coco_instance.yaml",
                    SWIN_OPTS + ["MODEL.WEIGHTS", str(weights[form])])
    model = build_model(cfg).eval()
    checkpointer = PartDistillCheckpointer(model)
    checkpointer.load(cfg.MODEL.WEIGHTS)
    assert checkpointer.last_incompatible.missing_keys == []
    assert checkpointer.last_incompatible.unexpected_keys == []
    assert checkpointer.last_incompatible.incorrect_shapes == []
    # 256 x 192: the stride-32 map is 8 x 6, not a multiple of the window (Swin padding is compared too)
    x = torch.randn(2, 3, 256, 192, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf.model(pixel_values=x, output_hidden_states=True)
        feats = model.backbone(x)
        mask, _, multi = model.sem_seg_head.pixel_decoder.forward_features(feats)
        logits, masks = ours_per_round(model.sem_seg_head.predictor(multi, mask))
        ref_logits = [hf.class_predictor(h.transpose(0, 1)) for h in ref.transformer_decoder_intermediate_states]
    assert max_abs_diff([feats[k] for k in sorted(feats)], list(ref.encoder_hidden_states)) <= TOL
    assert max_abs_diff(mask, ref.pixel_decoder_last_hidden_state) <= TOL
    assert max_abs_diff(multi, list(ref.pixel_decoder_hidden_states)) <= TOL
    assert max_abs_diff(logits, ref_logits) <= TOL
    assert max_abs_diff(masks, list(ref.masks_queries_logits)) <= TOL
    torch.testing.assert_close(model.criterion.empty_weight, hf.criterion.empty_weight, rtol=0, atol=0)


def test_folder_without_weights_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        PartDistillCheckpointer(torch.nn.Linear(1, 1)).load(str(tmp_path))


# ---------------------------------------------------------------- the comparison can fail
def _swap(a, b):
    def mutate(sd):
        sd[a], sd[b] = sd[b].clone(), sd[a].clone()
    return mutate


def _swap_q_k(key):
    def mutate(sd):
        q, k, v = sd[key].clone().chunk(3)
        sd[key] = torch.cat([k, q, v])
    return mutate


def _zero_row(key, row):
    def mutate(sd):
        sd[key] = sd[key].clone()
        sd[key][row] = 0
    return mutate


def _transpose(key):
    def mutate(sd):
        sd[key] = sd[key].t().contiguous()
    return mutate


PD, PRED = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
MUTATIONS = {
    "swapped query_feat/query_embed": _swap(PRED + "query_feat.weight", PRED + "query_embed.weight"),
    "swapped q/k rows of a self-attention": _swap_q_k(
        PRED + "transformer_self_attention_layers.1.self_attn.in_proj_weight"),
    "swapped encoder layers' FFNs": _swap(PD + "transformer.encoder.layers.0.linear1.weight",
                                          PD + "transformer.encoder.layers.1.linear1.weight"),
    "missing level embedding of one scale": _zero_row(PD + "transformer.level_embed", 1),
    "missing decoder level embedding of one scale": _zero_row(PRED + "level_embed.weight", 2),
    "transposed deformable value projection": _transpose(
        PD + "transformer.encoder.layers.0.self_attn.value_proj.weight"),
    "transposed cross-attention output projection": _transpose(
        PRED + "transformer_cross_attention_layers.1.multihead_attn.out_proj.weight"),
}


class _NoScaleF:
    """torch.nn.functional with SDPA's 1/sqrt(d_head) scale left out."""

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    @staticmethod
    def scaled_dot_product_attention(*args, **kwargs):
        return torch.nn.functional.scaled_dot_product_attention(*args, scale=1.0, **kwargs)


def _pixel_decoder_then_decoder(state, feats):
    pd = our_pixel_decoder({k[len(PD):]: v for k, v in state.items() if k.startswith(PD)})
    dec = our_decoder(state={k[len(PRED):]: v for k, v in state.items() if k.startswith(PRED)})
    with torch.no_grad():
        mask, _, multi = pd.forward_features(feats)
        return [mask, *multi, *[t for r in ours_per_round(dec(multi, mask)) for t in r]]


@pytest.fixture(scope="module")
def peer_pair():
    """(converted original-named state, inputs, HF outputs) of pixel decoder -> transformer decoder."""
    config = hf_config()
    hf_pd = hf_pixel_decoder(config, [CHANNELS[k] for k in sorted(CHANNELS)])
    hf_dec, classes = hf_transformer_module(config, 32)
    full = {f"model.pixel_level_module.decoder.{k}": v for k, v in hf_pd.state_dict().items()}
    full.update({f"model.transformer_module.{k}": v for k, v in hf_dec.state_dict().items()})
    full.update({f"class_predictor.{k}": v for k, v in classes.state_dict().items()})
    feats = backbone_features()
    mask, multi = run_hf_pixel_decoder(hf_pd, feats)
    logits, masks, _ = run_hf_transformer(hf_dec, classes, multi, mask)
    return convert_hf_mask2former_state_dict(full), feats, [mask, *multi, *logits, *masks]


def test_chained_decoders_equal_hf(peer_pair):
    state, feats, reference = peer_pair
    assert max_abs_diff(_pixel_decoder_then_decoder(state, feats), reference) <= TOL


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_mutated_weights_break_equivalence(peer_pair, name):
    state, feats, reference = peer_pair
    mutated = dict(state)
    MUTATIONS[name](mutated)
    assert max_abs_diff(_pixel_decoder_then_decoder(mutated, feats), reference) > 100 * TOL, name


def test_missing_attention_scale_breaks_equivalence(peer_pair, monkeypatch):
    state, feats, reference = peer_pair
    monkeypatch.setattr(decoder_layers, "F", _NoScaleF())
    assert max_abs_diff(_pixel_decoder_then_decoder(state, feats), reference) > 100 * TOL


# ---------------------------------------------------------------- importer edge cases
def test_importer_accepts_transformers_4_swin_names_and_rejects_unknown_keys():
    q, k, v = (torch.full((4, 4), float(i)) for i in range(3))
    block = "model.pixel_level_module.encoder.encoder.layers.0.blocks.1.attention."
    v4 = {block + "self.query.weight": q, block + "self.key.weight": k, block + "self.value.weight": v,
          block + "self.relative_position_index": torch.zeros(16, 16, dtype=torch.long),
          block + "output.dense.weight": q, "model.pixel_level_module.encoder.hidden_states_norms.stage3.bias": v}
    out = convert_hf_mask2former_state_dict(v4)
    assert set(out) == {"backbone.layers.0.blocks.1.attn.qkv.weight", "backbone.layers.0.blocks.1.attn.proj.weight",
                        "backbone.norm2.bias"}
    assert torch.equal(out["backbone.layers.0.blocks.1.attn.qkv.weight"], torch.cat([q, k, v]))
    with pytest.raises(ValueError, match="lacks the k projection"):
        convert_hf_mask2former_state_dict({block + "self.query.weight": q, block + "self.value.weight": v})
    resnet = {"model.pixel_level_module.encoder.embedder.embedder.convolution.weight": q}
    with pytest.raises(ValueError, match="embedder.convolution.*backbone=False"):
        convert_hf_mask2former_state_dict(resnet)
    assert convert_hf_mask2former_state_dict(resnet, backbone=False) == {}
    with pytest.raises(ValueError, match="model.extra_head.weight"):
        convert_hf_mask2former_state_dict({"model.extra_head.weight": q})
