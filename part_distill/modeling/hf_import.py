"""Import Hugging Face ``transformers`` Mask2Former weights into part_distill models.

``convert_hf_mask2former_state_dict`` renames the state dict of
``Mask2FormerForUniversalSegmentation`` (or of a bare ``Mask2FormerModel``) to the names of the
original Mask2Former / detectron2 checkpoints, which our modules use; ``checkpoint.py`` then applies
its usual renames (Swin patch merging, ``static_query``). ``PartDistillCheckpointer`` does both
automatically, so ``MODEL.WEIGHTS`` may be a ``save_pretrained`` folder, its ``model.safetensors`` /
``pytorch_model.bin``, or a ``torch.save`` of an HF state dict.

What changes between the two layouts (everything else is a pure rename):

* the decoder's self-attention keeps separate ``q_proj / k_proj / v_proj`` in HF and one packed
  ``in_proj_weight`` (rows q, k, v: ``nn.MultiheadAttention``'s layout) in the original; the Swin
  blocks likewise split ``attn.qkv`` into query / key / value;
* the Swin ``relative_position_index`` is a derived buffer: dropped (recomputed by timm); the
  ``swin.layernorm`` of HF's classification model is not a backbone output: dropped;
* only Swin backbones are converted (the published HF Mask2Former checkpoints are all Swin); other
  backbones raise unless ``backbone=False`` imports the heads alone.

Both transformers 4.x key spellings (``attention.self.query``, ``intermediate.dense``) and 5.x ones
(``attention.q_proj``, ``mlp.fc1``) are accepted.
"""
import json
import os
import re
from typing import Dict, List, Mapping, Optional, Tuple

import torch

__all__ = ["convert_hf_mask2former_state_dict", "is_hf_mask2former_state_dict", "read_hf_state_dict",
           "hf_weights_file"]

_PIXEL_DECODER = "sem_seg_head.pixel_decoder."
_PREDICTOR = "sem_seg_head.predictor."
_BACKBONE = "backbone."
_DROP = None  # a rule target meaning "derived or unused: not imported"

# (pattern on the key relative to the HF module, replacement relative to the original module)
_PIXEL_DECODER_RULES: List[Tuple[str, Optional[str]]] = [
    (r"level_embed", r"transformer.level_embed"),
    (r"input_projections\.(\d+)\.([01])\.(weight|bias)", r"input_proj.\1.\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)",
     r"transformer.encoder.layers.\1.self_attn.\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"transformer.encoder.layers.\1.norm1.\2"),
    (r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)", r"transformer.encoder.layers.\1.linear1.\2"),
    (r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)", r"transformer.encoder.layers.\1.linear2.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"transformer.encoder.layers.\1.norm2.\2"),
    (r"mask_projection\.(weight|bias)", r"mask_features.\1"),
    # FPN convs: HF Sequential(conv, GroupNorm[, ReLU]) -> detectron2 Conv2d with .norm (no conv bias)
    (r"(adapter|layer)_(\d+)\.0\.weight", r"\1_\2.weight"),
    (r"(adapter|layer)_(\d+)\.1\.(weight|bias)", r"\1_\2.norm.\3"),
]

_SELF = r"transformer_self_attention_layers.\1"
_CROSS = r"transformer_cross_attention_layers.\1"
_FFN = r"transformer_ffn_layers.\1"
_PREDICTOR_RULES: List[Tuple[str, Optional[str]]] = [
    (r"queries_embedder\.weight", r"query_embed.weight"),
    (r"queries_features\.weight", r"query_feat.weight"),
    (r"level_embed\.weight", r"level_embed.weight"),
    (r"input_projections\.(\d+)\.(weight|bias)", r"input_proj.\1.\2"),
    (r"decoder\.layernorm\.(weight|bias)", r"decoder_norm.\1"),
    (r"decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.(weight|bias)", r"mask_embed.layers.\1.\2"),
    (r"decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", _SELF + r".self_attn.in_proj_\3#\2"),
    (r"decoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", _SELF + r".self_attn.out_proj.\2"),
    (r"decoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", _SELF + r".norm.\2"),
    (r"decoder\.layers\.(\d+)\.cross_attn\.(in_proj_weight|in_proj_bias)", _CROSS + r".multihead_attn.\2"),
    (r"decoder\.layers\.(\d+)\.cross_attn\.out_proj\.(weight|bias)", _CROSS + r".multihead_attn.out_proj.\2"),
    (r"decoder\.layers\.(\d+)\.cross_attn_layer_norm\.(weight|bias)", _CROSS + r".norm.\2"),
    (r"decoder\.layers\.(\d+)\.fc1\.(weight|bias)", _FFN + r".linear1.\2"),
    (r"decoder\.layers\.(\d+)\.fc2\.(weight|bias)", _FFN + r".linear2.\2"),
    (r"decoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", _FFN + r".norm.\2"),
]

_BLOCK = r"(?:swin\.)?encoder\.layers\.(\d+)\.blocks\.(\d+)\."
_B = r"layers.\1.blocks.\2."
_SWIN_RULES: List[Tuple[str, Optional[str]]] = [
    (r"(?:swin\.)?embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"(?:swin\.)?embeddings\.norm\.(weight|bias)", r"patch_embed.norm.\1"),
    (_BLOCK + r"layernorm_before\.(weight|bias)", _B + r"norm1.\3"),
    (_BLOCK + r"layernorm_after\.(weight|bias)", _B + r"norm2.\3"),
    (_BLOCK + r"attention\.(?:self\.|relative_position_bias\.)relative_position_bias_table",
     _B + "attn.relative_position_bias_table"),
    (_BLOCK + r"attention\.(?:self\.|relative_position_bias\.)relative_position_index", _DROP),
    (_BLOCK + r"attention\.(?:self\.)?(q|k|v|query|key|value)(?:_proj)?\.(weight|bias)", _B + r"attn.qkv.\4#\3"),
    (_BLOCK + r"attention\.(?:o_proj|output\.dense)\.(weight|bias)", _B + r"attn.proj.\3"),
    (_BLOCK + r"(?:mlp\.fc1|intermediate\.dense)\.(weight|bias)", _B + r"mlp.fc1.\3"),
    (_BLOCK + r"(?:mlp\.fc2|output\.dense)\.(weight|bias)", _B + r"mlp.fc2.\3"),
    (r"(?:swin\.)?encoder\.layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)",
     r"layers.\1.downsample.\2"),
    (r"(?:swin\.)?layernorm\.(weight|bias)", _DROP),
]
# HF names the output norms by stage (1-based), the original by res level (0-based): computed below.
_STAGE_NORM = re.compile(r"hidden_states_norms\.stage(\d+)\.(weight|bias)")

_SECTIONS = [  # (HF prefix, original prefix, rules)
    ("pixel_level_module.decoder.", _PIXEL_DECODER, _PIXEL_DECODER_RULES),
    ("transformer_module.", _PREDICTOR, _PREDICTOR_RULES),
    ("pixel_level_module.encoder.", _BACKBONE, _SWIN_RULES),
]
_PACKED_ORDER = {"q": 0, "query": 0, "k": 1, "key": 1, "v": 2, "value": 2}


def is_hf_mask2former_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for the state dict of HF's ``Mask2FormerForUniversalSegmentation`` / ``Mask2FormerModel``."""
    return any(k.startswith(("model.transformer_module.", "transformer_module.")) for k in state_dict)


def _rename(rel: str, rules) -> Tuple[bool, Optional[str]]:
    for pattern, target in rules:
        m = re.fullmatch(pattern, rel)
        if m:
            return True, None if target is None else m.expand(target)
    return False, None


def convert_hf_mask2former_state_dict(hf_state: Mapping[str, torch.Tensor], backbone: bool = True
                                      ) -> Dict[str, torch.Tensor]:
    """HF Mask2Former state dict -> original Mask2Former names (``backbone.*``, ``sem_seg_head.*``, ``criterion.*``).

    Args:
        hf_state: ``Mask2FormerForUniversalSegmentation.state_dict()`` (keys ``model.*``,
            ``class_predictor.*``, ``criterion.empty_weight``) or ``Mask2FormerModel.state_dict()``.
        backbone: convert the (Swin) backbone too; False drops every backbone key.
    Raises:
        ValueError naming the first key no rule knows (e.g. a non-Swin backbone), or a
        self-attention / Swin qkv projection whose q, k or v part is missing.
    """
    out: Dict[str, torch.Tensor] = {}
    packed: Dict[str, Dict[int, torch.Tensor]] = {}
    for key, value in hf_state.items():
        rel = key[len("model."):] if key.startswith("model.") else key
        if rel.startswith("class_predictor."):
            out[_PREDICTOR + "class_embed." + rel[len("class_predictor."):]] = value
            continue
        if rel == "criterion.empty_weight":
            out[rel] = value
            continue
        for hf_prefix, prefix, rules in _SECTIONS:
            if rel.startswith(hf_prefix):
                break
        else:
            raise ValueError(f"HF Mask2Former key '{key}' is not part of a known module")
        if prefix == _BACKBONE and not backbone:
            continue
        known, target = _rename(rel[len(hf_prefix):], rules)
        stage_norm = _STAGE_NORM.fullmatch(rel[len(hf_prefix):]) if prefix == _BACKBONE else None
        if stage_norm:
            known, target = True, f"norm{int(stage_norm.group(1)) - 1}.{stage_norm.group(2)}"
        if not known:
            hint = (" (only Swin backbones are converted: pass backbone=False to import the heads only)"
                    if prefix == _BACKBONE else "")
            raise ValueError(f"HF Mask2Former key '{key}' has no known original name{hint}")
        if target is None:
            continue
        if "#" in target:  # one third of a packed q/k/v projection
            name, part = target.split("#")
            packed.setdefault(prefix + name, {})[_PACKED_ORDER[part]] = value
        else:
            out[prefix + target] = value
    for name, parts in packed.items():
        if sorted(parts) != [0, 1, 2]:
            lacking = "qkv"[min(set(range(3)) - set(parts))]
            raise ValueError(f"'{name}': the HF state dict lacks the {lacking} projection")
        out[name] = torch.cat([parts[0], parts[1], parts[2]], 0)
    return out


def hf_weights_file(folder: str) -> str:
    """The weights of a ``save_pretrained`` folder: (sharded) safetensors first, then pytorch_model.bin."""
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{folder} is not a Hugging Face save_pretrained folder: no model.safetensors "
                            f"or pytorch_model.bin in it")


def read_hf_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Tensors of a ``save_pretrained`` folder, a ``.safetensors`` / ``.bin`` file or a shard index ``.json``."""
    if os.path.isdir(path):
        path = hf_weights_file(path)
    if path.endswith(".index.json"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(read_hf_state_dict(os.path.join(os.path.dirname(path), shard)))
        return state
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)
