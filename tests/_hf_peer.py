"""Hugging Face peers of our decoders (transformers' Mask2Former and MaskFormer), shared by the tests.

Each builder returns an HF module with random weights (HF's own init plus seeded noise, so that no
weight is a constant that would hide a mix-up: sampling offsets, attention weights and biases all
non-zero) in eval mode. ``*_to_ours`` turn its state dict into the names of our module: through
the package's importer for Mask2Former (``convert_hf_mask2former_state_dict``, so the importer is
what is tested), through a mapping written here for MaskFormer's FPN (not a feature of the package).
"""
import pytest
import torch

from part_distill.modeling.hf_import import convert_hf_mask2former_state_dict

TOL = 1e-4  # max abs difference allowed between us and the peer, fp32 on CPU


def _transformers():
    return pytest.importorskip("transformers")


def hf_config(hidden=32, mask_dim=32, heads=4, queries=8, num_classes=3, enc_layers=2, enc_ffn=48,
              dec_layers=3, dec_ffn=48, pre_norm=False, enforce_input_projection=False, backbone_config=None):
    """Mask2FormerConfig of the given sizes; ``dec_layers`` counts transformer layers (HF: +1)."""
    tf = _transformers()
    if backbone_config is None:  # never built: only the heads are instantiated
        backbone_config = tf.SwinConfig(out_features=["stage1", "stage2", "stage3", "stage4"])
    config = tf.Mask2FormerConfig(
        backbone_config=backbone_config, feature_size=hidden, mask_feature_size=mask_dim, hidden_dim=hidden,
        encoder_feedforward_dim=enc_ffn, encoder_layers=enc_layers, decoder_layers=dec_layers + 1,
        num_attention_heads=heads, dim_feedforward=dec_ffn, num_queries=queries, pre_norm=pre_norm,
        enforce_input_projection=enforce_input_projection, num_labels=num_classes)
    return config


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """HF's init leaves zeros and ones (offset weights, biases, norms): add seeded noise to every parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not torch.isfinite(p).all():  # torch.Tensor() storage left uninitialised by HF
                p.zero_()
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def init_like_hf_(module: torch.nn.Module, config) -> None:
    """Apply HF's ``_init_weights`` to a bare submodule (it is only called by ``PreTrainedModel``)."""
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerPreTrainedModel

    holder = Mask2FormerPreTrainedModel(config)
    for m in module.modules():
        holder._init_weights(m)


def hf_pixel_decoder(config, feature_channels, seed=0):
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerPixelDecoder

    torch.manual_seed(seed)
    module = Mask2FormerPixelDecoder(config, feature_channels=list(feature_channels))
    init_like_hf_(module, config)
    return randomize_(module, seed)


def hf_transformer_module(config, in_features, seed=0):
    """(Mask2FormerTransformerModule, class_predictor) as Mask2FormerForUniversalSegmentation holds them."""
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerTransformerModule

    torch.manual_seed(seed)
    module = Mask2FormerTransformerModule(in_features, config)
    init_like_hf_(module, config)
    classes = torch.nn.Linear(config.hidden_dim, config.num_labels + 1)
    return randomize_(module, seed), randomize_(classes, seed + 1)


def pixel_decoder_to_ours(hf_decoder) -> dict:
    """HF pixel decoder state dict -> ``MSDeformAttnPixelDecoder`` keys, through the package's importer."""
    full = {f"model.pixel_level_module.decoder.{k}": v for k, v in hf_decoder.state_dict().items()}
    prefix = "sem_seg_head.pixel_decoder."
    return {k[len(prefix):]: v for k, v in convert_hf_mask2former_state_dict(full).items()}


def transformer_module_to_ours(hf_module, class_predictor) -> dict:
    """HF transformer module + class predictor -> ``MaskedAttentionDecoder`` keys, through the importer."""
    full = {f"model.transformer_module.{k}": v for k, v in hf_module.state_dict().items()}
    full.update({f"class_predictor.{k}": v for k, v in class_predictor.state_dict().items()})
    prefix = "sem_seg_head.predictor."
    return {k[len(prefix):]: v for k, v in convert_hf_mask2former_state_dict(full).items()}


@torch.no_grad()
def run_hf_pixel_decoder(hf_decoder, features: dict):
    """features: res2..res5 -> (mask_features, [3 multi-scale maps coarse -> fine])."""
    out = hf_decoder([features[k] for k in sorted(features)])
    return out.mask_features, list(out.multi_scale_features)


@torch.no_grad()
def run_hf_transformer(hf_module, class_predictor, multi_scale, mask_features):
    """-> (per-round class logits, per-round mask logits, normed final queries [B, Q, C]).

    Round 0 is the prediction of the learned queries themselves, as in our ``aux_outputs[0]``.
    """
    out = hf_module(multi_scale_features=list(multi_scale), mask_features=mask_features, output_hidden_states=True)
    logits = [class_predictor(h.transpose(0, 1)) for h in out.intermediate_hidden_states]
    return logits, list(out.masks_queries_logits), out.intermediate_hidden_states[-1].transpose(0, 1)


def ours_per_round(out: dict):
    """Our decoder output -> (per-round class logits, per-round mask logits), round 0 first."""
    rounds = list(out["aux_outputs"]) + [{"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}]
    return [r["pred_logits"] for r in rounds], [r["pred_masks"] for r in rounds]


def max_abs_diff(a, b) -> float:
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), (len(a), len(b))
        return max(max_abs_diff(x, y) for x, y in zip(a, b))
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return float((a - b).abs().max())


# ---------------------------------------------------------------- MaskFormer's FPN (BasePixelDecoder)
def hf_fpn_pixel_decoder(feature_channels, feature_size, mask_dim, seed=0):
    """transformers' MaskFormerPixelDecoder: the FPN of MaskFormer/Mask2Former's ``BasePixelDecoder``."""
    _transformers()
    from transformers.models.maskformer.modeling_maskformer import MaskFormerPixelDecoder

    torch.manual_seed(seed)
    module = MaskFormerPixelDecoder(in_features=feature_channels[-1], lateral_widths=list(feature_channels[:-1]),
                                    feature_size=feature_size, mask_feature_size=mask_dim)
    return randomize_(module, seed)


def fpn_to_ours(hf_fpn, num_levels: int) -> dict:
    """MaskFormer FPN names -> ``FPNPixelDecoder`` (BasePixelDecoder) names.

    HF's ``stem`` is the coarsest level's 3x3 conv (``layer_{L}``); ``layers.{i}`` run coarse -> fine
    from the second coarsest level, i.e. ``adapter_{L-1-i}`` (``proj``) and ``layer_{L-1-i}`` (``block``).
    """
    out = {}
    for key, value in hf_fpn.state_dict().items():
        parts = key.split(".")
        if parts[0] == "mask_projection":
            out[f"mask_features.{parts[1]}"] = value
        elif parts[:2] == ["fpn", "stem"]:  # fpn.stem.layers.{0 conv, 1 GN}.*  (or fpn.stem.{0,1}.*)
            idx, p = parts[-2], parts[-1]
            out[f"layer_{num_levels}." + ("weight" if idx == "0" else f"norm.{p}")] = value
        elif parts[:2] == ["fpn", "layers"]:
            level = num_levels - 1 - int(parts[2])
            if parts[3] == "proj":
                out[f"adapter_{level}." + ("weight" if parts[4] == "0" else f"norm.{parts[5]}")] = value
            else:  # block.layers.{0 conv, 1 GN}.* (or block.{0,1}.*)
                idx, p = parts[-2], parts[-1]
                out[f"layer_{level}." + ("weight" if idx == "0" else f"norm.{p}")] = value
        else:
            raise KeyError(key)
    return out
