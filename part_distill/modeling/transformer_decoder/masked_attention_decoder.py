"""Masked-attention transformer decoder (the Mask2Former decoder design, written for part_distill).

Used as the instance decoder D^o (object classes) and as the part decoder D^p (1 "part" class in
stage 2, NUM_OBJECT_CLASSES * k cluster slots in stage 4); the part decoder's normed query
features f^p are returned as ``query_features`` for the class-specific ranker.
"""
import fvcore.nn.weight_init as weight_init
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import Conv2d

from .build import TRANSFORMER_DECODER_REGISTRY
from .layers import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer
from ..pixel_decoder.position_encoding import PositionEmbeddingSine


def attention_mask_from_logits(mask_logits, size):
    """Cross-attention mask of the next layer from this layer's mask logits.

    ``mask_logits`` [B, Q, H, W] -> bool [B, 1, Q, h*w] at level ``size`` (h, w), True = may attend:
    a query attends where its predicted mask is >= 0.5. A query whose mask is empty at this
    resolution would attend nothing (NaN attention), so it attends everything instead. Computed
    with tensor ops only (no host sync); broadcast over heads by SDPA instead of repeated.
    """
    resized = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
    allowed = resized.sigmoid().flatten(2) >= 0.5
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed.unsqueeze(1).detach()


@TRANSFORMER_DECODER_REGISTRY.register()
class MaskedAttentionDecoder(nn.Module):
    """Learned queries refined over 3 feature levels (round robin, coarse to fine).

    Each layer: masked cross-attention -> self-attention -> FFN, then class/mask heads on the
    ``decoder_norm``-ed queries; the masks of one layer give the attention mask of the next.
    """

    num_feature_levels = 3

    @configurable
    def __init__(
        self,
        in_channels,
        mask_classification=True,
        *,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        enforce_input_project: bool,
    ):
        """
        Args:
            in_channels: channels of the pixel decoder's multi-scale features.
            mask_classification: must be True (kept for Mask2Former's call signature).
            num_classes: foreground classes; ``class_embed`` predicts ``num_classes + 1`` logits.
            dec_layers: number of transformer layers (config DEC_LAYERS - 1: the learned queries
                themselves are also supervised).
            mask_dim: channels of ``mask_features``.
            enforce_input_project: 1x1 projections even when ``in_channels == hidden_dim``.
        """
        super().__init__()
        if not mask_classification:
            raise ValueError("MaskedAttentionDecoder only supports mask classification")
        self.mask_classification = True
        self.num_queries = num_queries
        self.num_layers = dec_layers
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)

        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, pre_norm) for _ in range(dec_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, pre_norm) for _ in range(dec_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, pre_norm) for _ in range(dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
                weight_init.c2_xavier_fill(proj)
            else:
                # Parameter-free so that checkpoints without input_proj.* load cleanly.
                proj = nn.Sequential()
            self.input_proj.append(proj)

        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification=True):
        mf = cfg.MODEL.MASK_FORMER
        if mf.DEC_LAYERS < 1:
            raise ValueError(f"MODEL.MASK_FORMER.DEC_LAYERS must be >= 1, got {mf.DEC_LAYERS}")
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "hidden_dim": mf.HIDDEN_DIM,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "nheads": mf.NHEADS,
            "dim_feedforward": mf.DIM_FEEDFORWARD,
            "dec_layers": mf.DEC_LAYERS - 1,
            "pre_norm": mf.PRE_NORM,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
        }

    def forward(self, x, mask_features, mask=None):
        """
        Args:
            x: list of 3 feature maps [B, in_channels, h_l, w_l], coarsest (stride 32) first.
            mask_features: [B, mask_dim, H/4, W/4].
            mask: ignored (padding masks do not help, as in Mask2Former).

        Returns:
            dict with ``pred_logits`` [B, Q, num_classes + 1], ``pred_masks`` [B, Q, H/4, W/4]
            (logits), ``aux_outputs`` (list of the same two keys for every earlier prediction,
            first = raw learned queries) and ``query_features`` [B, Q, hidden_dim]
            (``decoder_norm`` of the final queries, the f^p of the paper).
        """
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(x)}")
        srcs, poss, sizes = [], [], []
        for level, feat in enumerate(x):
            sizes.append(feat.shape[-2:])
            poss.append(self.pe_layer(feat).flatten(2).transpose(1, 2))
            src = self.input_proj[level](feat).flatten(2) + self.level_embed.weight[level][None, :, None]
            srcs.append(src.transpose(1, 2))

        batch = mask_features.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
        output = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)

        logits, masks, attn_mask, decoded = self._heads(output, mask_features, sizes[0])
        all_logits, all_masks = [logits], [masks]
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            output = self.transformer_cross_attention_layers[i](
                output, srcs[level], poss[level], query_pos, attn_mask
            )
            output = self.transformer_self_attention_layers[i](output, query_pos)
            output = self.transformer_ffn_layers[i](output)
            next_size = sizes[(i + 1) % self.num_feature_levels]
            logits, masks, attn_mask, decoded = self._heads(output, mask_features, next_size)
            all_logits.append(logits)
            all_masks.append(masks)

        return {
            "pred_logits": all_logits[-1],
            "pred_masks": all_masks[-1],
            "aux_outputs": [
                {"pred_logits": a, "pred_masks": b} for a, b in zip(all_logits[:-1], all_masks[:-1])
            ],
            "query_features": decoded,
        }

    def _heads(self, output, mask_features, attn_size):
        decoded = self.decoder_norm(output)
        logits = self.class_embed(decoded)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoded), mask_features)
        return logits, masks, attention_mask_from_logits(masks, attn_size), decoded


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(MaskedAttentionDecoder):
    """Alias under Mask2Former's registry name, so official YAML configs select our decoder."""
