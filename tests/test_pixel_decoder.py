"""Pixel decoders: deformable attention vs a per-point loop, outputs vs the HF peers, checkpoint names, gradients."""
import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from part_distill import add_part_distill_config
from part_distill.modeling.pixel_decoder import (
    PIXEL_DECODER_REGISTRY,
    FPNPixelDecoder,
    MSDeformAttn,
    MSDeformAttnPixelDecoder,
    PositionEmbeddingSine,
    build_pixel_decoder,
    ms_deform_attn_sample,
)

from _hf_peer import (TOL, fpn_to_ours, hf_config, hf_fpn_pixel_decoder, hf_pixel_decoder, max_abs_diff,
                      pixel_decoder_to_ours, run_hf_pixel_decoder)

R50_SHAPES = {
    "res2": ShapeSpec(channels=256, stride=4),
    "res3": ShapeSpec(channels=512, stride=8),
    "res4": ShapeSpec(channels=1024, stride=16),
    "res5": ShapeSpec(channels=2048, stride=32),
}


def _bilinear_zero_pad(img, x, y):
    """img [D, H, W]; (x, y) normalised in [0, 1] with pixel centres at (i + 0.5) / size."""
    d, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(d, dtype=torch.float64)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            wgt = (1 - abs(px - xx)) * (1 - abs(py - yy))
            if 0 <= xx < w and 0 <= yy < h:
                out += wgt * img[:, yy, xx].double()
    return out


def naive_ms_deform_attn(value, shapes, locs, attn):
    """One query, head, level and point at a time."""
    n, _, m, d = value.shape
    _, lq, _, num_l, p, _ = locs.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(n, lq, m, d, dtype=torch.float64)
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                for lvl, (h, w) in enumerate(shapes):
                    img = value[b, starts[lvl]:starts[lvl + 1], head].T.reshape(d, h, w)
                    for pt in range(p):
                        x, y = locs[b, q, head, lvl, pt].tolist()
                        out[b, q, head] += attn[b, q, head, lvl, pt].double() * _bilinear_zero_pad(img, x, y)
    return out.view(n, lq, m * d)


def test_deform_sampling_equals_naive_loop():
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (3, 4), (2, 2)]
    n, m, d, lq, p = 2, 3, 4, 6, 3
    value = torch.randn(n, sum(h * w for h, w in shapes), m, d, generator=g)
    # locations partly outside [0, 1] to exercise zero padding
    locs = torch.rand(n, lq, m, len(shapes), p, 2, generator=g) * 1.4 - 0.2
    attn = torch.rand(n, lq, m, len(shapes), p, generator=g)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    got = ms_deform_attn_sample(value, shapes, locs, attn)
    ref = naive_ms_deform_attn(value, shapes, locs, attn)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_msdeformattn_module_equals_naive_with_its_own_offsets():
    torch.manual_seed(0)
    shapes = [(4, 6), (2, 3)]
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=3)
    for prm in attn.parameters():  # non-trivial offsets and weights
        torch.nn.init.normal_(prm, std=0.3)
    s = sum(h * w for h, w in shapes)
    src, query = torch.randn(2, s, 16), torch.randn(2, 5, 16)
    refs = torch.rand(2, 5, 2, 2)
    out = attn(query, refs, src, shapes)
    # the same computation spelled out: pixel offsets / (w, h) per level, softmax over L*P
    value = attn.value_proj(src).view(2, s, 2, 8)
    off = attn.sampling_offsets(query).view(2, 5, 2, 2, 3, 2)
    norm = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
    locs = refs[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
    wts = attn.attention_weights(query).view(2, 5, 2, 6).softmax(-1).view(2, 5, 2, 2, 3)
    ref = naive_ms_deform_attn(value.detach(), shapes, locs.detach(), wts.detach())
    expected = attn.output_proj(ref.float())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_msdeformattn_initial_offsets_point_in_8_directions_at_growing_radii():
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=8, n_points=2)
    b = attn.sampling_offsets.bias.view(8, 2, 2, 2)
    torch.testing.assert_close(b[0, 0, 0], torch.tensor([1.0, 0.0]))  # head 0: +x, radius 1
    torch.testing.assert_close(b[2, 1, 1], torch.tensor([0.0, 2.0]), atol=1e-6, rtol=0)  # head 2: +y, radius 2
    torch.testing.assert_close(b[:, 0], b[:, 1])  # same pattern on every level


def test_position_embedding_matches_formula():
    pe = PositionEmbeddingSine(num_pos_feats=4, normalize=True)
    out = pe(torch.zeros(1, 3, 2, 3))
    assert out.shape == (1, 8, 2, 3)
    # y half first: channel 0 = sin(y_norm / 10000^0), channel 1 = cos(y_norm / 10000^0)
    y = torch.tensor([1.0, 2.0]) / (2 + 1e-6) * 2 * math.pi
    x = torch.tensor([1.0, 2.0, 3.0]) / (3 + 1e-6) * 2 * math.pi
    torch.testing.assert_close(out[0, 0, :, 0], y.sin())
    torch.testing.assert_close(out[0, 1, :, 0], y.cos())
    torch.testing.assert_close(out[0, 2, :, 0], (y / 100.0).sin())  # 10000^(2*1/4)
    torch.testing.assert_close(out[0, 4, 0, :], x.sin())


def _mask2former_r50_pixel_decoder_keys():
    """Names and shapes of ``sem_seg_head.pixel_decoder.*`` in the official Mask2Former R50
    COCO instance checkpoint (mask2former/modeling/pixel_decoder/msdeformattn.py)."""
    keys = {"transformer.level_embed": (3, 256)}
    for i, c in enumerate([2048, 1024, 512]):  # res5 -> res3
        keys.update({f"input_proj.{i}.0.weight": (256, c, 1, 1), f"input_proj.{i}.0.bias": (256,),
                     f"input_proj.{i}.1.weight": (256,), f"input_proj.{i}.1.bias": (256,)})
    for l in range(6):
        p = f"transformer.encoder.layers.{l}."
        keys.update({p + "self_attn.sampling_offsets.weight": (192, 256), p + "self_attn.sampling_offsets.bias": (192,),
                     p + "self_attn.attention_weights.weight": (96, 256), p + "self_attn.attention_weights.bias": (96,),
                     p + "self_attn.value_proj.weight": (256, 256), p + "self_attn.value_proj.bias": (256,),
                     p + "self_attn.output_proj.weight": (256, 256), p + "self_attn.output_proj.bias": (256,),
                     p + "norm1.weight": (256,), p + "norm1.bias": (256,), p + "norm2.weight": (256,), p + "norm2.bias": (256,),
                     p + "linear1.weight": (1024, 256), p + "linear1.bias": (1024,),
                     p + "linear2.weight": (256, 1024), p + "linear2.bias": (256,)})
    keys.update({"mask_features.weight": (256, 256, 1, 1), "mask_features.bias": (256,),
                 "adapter_1.weight": (256, 256, 1, 1), "adapter_1.norm.weight": (256,), "adapter_1.norm.bias": (256,),
                 "layer_1.weight": (256, 256, 3, 3), "layer_1.norm.weight": (256,), "layer_1.norm.bias": (256,)})
    return keys


def test_msdeform_pixel_decoder_has_exact_mask2former_r50_keys():
    decoder = MSDeformAttnPixelDecoder(R50_SHAPES)  # kwargs path, Mask2Former R50 defaults
    got = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    assert got == _mask2former_r50_pixel_decoder_keys()


def _cfg(decoder="MSDeformAttnPixelDecoder", backbone="build_efficientnet_lite_backbone"):
    cfg = get_cfg()
    add_part_distill_config(cfg)
    cfg.MODEL.BACKBONE.NAME = backbone
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = decoder
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 64
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 32
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 2
    return cfg


@pytest.mark.parametrize("backbone", ["build_efficientnet_lite_backbone", "build_resnet_gn_backbone"])
@pytest.mark.parametrize("decoder", ["MSDeformAttnPixelDecoder", "FPNPixelDecoder"])
def test_pixel_decoder_gradients_and_values_vs_hf(backbone, decoder):
    cfg = _cfg(decoder, backbone)
    bb = build_backbone(cfg)
    pd = build_pixel_decoder(cfg, bb.output_shape())
    assert type(pd) is PIXEL_DECODER_REGISTRY.get(decoder)
    x = torch.randn(2, 3, 128, 96, requires_grad=True)
    mask, enc, ms = pd.forward_features(bb(x))
    assert mask.shape == (2, 32, 32, 24)
    assert [tuple(t.shape) for t in ms] == [(2, 64, 4, 3), (2, 64, 8, 6), (2, 64, 16, 12)]
    (mask.mean() + sum(t.mean() for t in ms)).backward()
    assert x.grad.abs().sum() > 0
    no_grad = [n for n, p in pd.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    if decoder == "MSDeformAttnPixelDecoder":
        # Positions (and so level embeddings) act only through the offset / attention-weight
        # projections, whose weights start at zero: no gradient at init, as in Deformable DETR.
        assert no_grad == ["transformer.level_embed"]
        for layer in pd.transformer.encoder.layers:
            torch.nn.init.normal_(layer.self_attn.sampling_offsets.weight, std=0.01)
        pd.zero_grad()
        mask, _, ms = pd.forward_features(bb(x))
        (mask.mean() + sum(t.mean() for t in ms)).backward()
        assert pd.transformer.level_embed.grad.abs().sum() > 0
    else:
        assert not no_grad, no_grad
    # Values: the HF peer (Mask2Former's deformable pixel decoder / MaskFormer's FPN, i.e. the
    # original BasePixelDecoder) with random weights, loaded into ours, on this backbone's features.
    with torch.no_grad():
        feats = {k: v.detach() for k, v in bb(x).items()}
        channels = [v.channels for _, v in sorted(bb.output_shape().items(), key=lambda kv: kv[1].stride)]
        if decoder == "MSDeformAttnPixelDecoder":
            hf = hf_pixel_decoder(hf_config(hidden=64, mask_dim=32, heads=8, enc_layers=2, enc_ffn=1024), channels)
            pd.load_state_dict(pixel_decoder_to_ours(hf), strict=True)
            ref_mask, ref_ms = run_hf_pixel_decoder(hf, feats)
            ref_enc = ref_ms[0]
        else:
            hf = hf_fpn_pixel_decoder(channels, feature_size=64, mask_dim=32)
            pd.load_state_dict(fpn_to_ours(hf, num_levels=len(channels)), strict=True)
            ordered = [feats[k] for k in sorted(feats)]
            out = hf(ordered, output_hidden_states=True)
            # HF returns the top-down levels below the coarsest; its stem is the coarsest level's conv
            ref_enc = hf.fpn.stem(ordered[-1])
            ref_mask, ref_ms = out.last_hidden_state, [ref_enc, *out.hidden_states[:2]]
        mask, enc, ms = pd.eval().forward_features(feats)
    assert max_abs_diff(mask, ref_mask) <= TOL
    assert max_abs_diff(ms, ref_ms) <= TOL
    assert max_abs_diff(enc, ref_enc) <= TOL


def test_mask_features_see_every_level():
    """Changing res5 alone must change the stride-4 mask features (top-down path works)."""
    torch.manual_seed(0)
    for cls in (MSDeformAttnPixelDecoder, FPNPixelDecoder):
        kwargs = dict(conv_dim=32, mask_dim=16)
        if cls is MSDeformAttnPixelDecoder:
            kwargs["transformer_enc_layers"] = 1
        shapes = {k: ShapeSpec(channels=8, stride=v.stride) for k, v in R50_SHAPES.items()}
        pd = cls(shapes, **kwargs).eval()
        feats = {k: torch.randn(1, 8, 64 // v.stride, 64 // v.stride) for k, v in shapes.items()}
        a = pd.forward_features(feats)[0]
        feats["res5"] = feats["res5"] + torch.randn_like(feats["res5"])  # not a constant: GN would remove it
        b = pd.forward_features(feats)[0]
        assert (a - b).abs().max() > 1e-4, cls.__name__


def test_configurable_from_cfg_equals_from_kwargs():
    cfg = _cfg()
    shapes = {k: ShapeSpec(channels=16, stride=v.stride) for k, v in R50_SHAPES.items()}
    torch.manual_seed(0)
    from_cfg = MSDeformAttnPixelDecoder(cfg, shapes)
    torch.manual_seed(0)
    from_kwargs = MSDeformAttnPixelDecoder(
        shapes, conv_dim=64, mask_dim=32, norm="GN", transformer_in_features=["res3", "res4", "res5"],
        transformer_enc_layers=2, transformer_nheads=8, transformer_dim_feedforward=1024,
        transformer_dropout=0.0, transformer_n_points=4, common_stride=4)
    sa, sb = from_cfg.state_dict(), from_kwargs.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    fpn = FPNPixelDecoder(cfg, shapes)
    assert fpn.mask_dim == 32 and fpn.mask_features.in_channels == 64


def test_fpn_decoder_uses_basepixeldecoder_names():
    pd = FPNPixelDecoder(R50_SHAPES, conv_dim=256, mask_dim=256)
    names = {k.split(".")[0] for k in pd.state_dict()}
    assert names == {"adapter_1", "adapter_2", "adapter_3", "layer_1", "layer_2", "layer_3", "layer_4", "mask_features"}
    assert pd.layer_4.weight.shape == (256, 2048, 3, 3)  # coarsest level: 3x3 conv straight on res5


def test_bad_config_errors_name_the_key():
    cfg = _cfg()
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5", "res6"]
    with pytest.raises(ValueError, match="IN_FEATURES"):
        MSDeformAttnPixelDecoder(cfg, R50_SHAPES)
    with pytest.raises(ValueError, match="Encoder features"):
        MSDeformAttnPixelDecoder(R50_SHAPES, transformer_in_features=["res6"])
    with pytest.raises(ValueError, match="levels"):
        MSDeformAttn(d_model=16, n_levels=2, n_heads=2)(torch.randn(1, 1, 16), torch.rand(1, 1, 2, 2), torch.randn(1, 4, 16), [(2, 2)])


def test_msdeform_decoder_under_bf16_autocast_matches_fp32():
    torch.manual_seed(0)
    shapes = {k: ShapeSpec(channels=16, stride=v.stride) for k, v in R50_SHAPES.items()}
    pd = MSDeformAttnPixelDecoder(shapes, conv_dim=32, mask_dim=16, transformer_enc_layers=1).eval()
    for layer in pd.transformer.encoder.layers:  # non-trivial sampling offsets
        torch.nn.init.normal_(layer.self_attn.sampling_offsets.weight, std=0.05)
    feats = {k: torch.randn(1, 16, 128 // v.stride, 128 // v.stride) for k, v in shapes.items()}
    with torch.no_grad():
        ref = pd.forward_features(feats)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = pd.forward_features(feats)[0]
    assert torch.isfinite(got).all()
    rel = (got.float() - ref).norm() / ref.norm()
    assert rel < 0.05, float(rel)
