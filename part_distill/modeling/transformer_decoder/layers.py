"""Building blocks of the masked-attention decoder.

Parameter names follow ``nn.MultiheadAttention`` / Mask2Former (``self_attn.in_proj_weight``,
``multihead_attn.out_proj.weight``, ``linear1``, ``norm`` ...) so official checkpoints load,
but all tensors are batch-first ``[B, L, C]`` and attention runs through
``F.scaled_dot_product_attention`` (fused kernels on GPU, bf16-safe, no head-repeated masks).
"""
import torch
from torch import nn
from torch.nn import functional as F


class MultiheadAttention(nn.Module):
    """Batch-first multi-head attention with ``nn.MultiheadAttention``'s parameter layout.

    ``attn_mask``: boolean, True = may attend (SDPA convention, the opposite of
    ``nn.MultiheadAttention``), broadcastable to ``[B, num_heads, Lq, Lk]``.
    """

    def __init__(self, embed_dim, num_heads):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x):
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, -1).transpose(1, 2)

    def forward(self, query, key, value, attn_mask=None):
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self._heads(F.linear(query, w_q, b_q))
        k = self._heads(F.linear(key, w_k, b_k))
        v = self._heads(F.linear(value, w_v, b_v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.embed_dim))


class SelfAttentionLayer(nn.Module):
    """Residual self-attention among queries; positions are added to q and k, not v."""

    def __init__(self, d_model, nhead, normalize_before=False):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before

    def forward(self, tgt, query_pos):
        x = self.norm(tgt) if self.normalize_before else tgt
        q = x + query_pos
        tgt = tgt + self.self_attn(q, q, x)
        return tgt if self.normalize_before else self.norm(tgt)


class CrossAttentionLayer(nn.Module):
    """Residual (masked) cross-attention from queries to a flattened feature level."""

    def __init__(self, d_model, nhead, normalize_before=False):
        super().__init__()
        self.multihead_attn = MultiheadAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before

    def forward(self, tgt, memory, memory_pos, query_pos, attn_mask=None):
        x = self.norm(tgt) if self.normalize_before else tgt
        tgt = tgt + self.multihead_attn(x + query_pos, memory + memory_pos, memory, attn_mask)
        return tgt if self.normalize_before else self.norm(tgt)


class FFNLayer(nn.Module):
    """Residual two-layer ReLU MLP."""

    def __init__(self, d_model, dim_feedforward, normalize_before=False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(self, tgt):
        x = self.norm(tgt) if self.normalize_before else tgt
        tgt = tgt + self.linear2(F.relu(self.linear1(x)))
        return tgt if self.normalize_before else self.norm(tgt)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (module names ``layers.0 .. layers.N-1``)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x
