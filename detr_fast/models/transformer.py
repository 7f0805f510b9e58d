"""DETR's post-norm encoder-decoder transformer, batch-first internally.

Parameter names equal those of the official DETR (nn.MultiheadAttention's in_proj_weight / in_proj_bias /
out_proj, linear1/2, norm1/2/3, decoder.norm), so official checkpoints load unchanged. The attention core runs
either detr_fast.ops.attention ("fused") or nn.MultiheadAttention's own math ("reference"); "auto" picks the fused
kernel for CUDA tensors and the reference for CPU tensors. With fused_norm, each post-norm step
norm(residual + dropout(x)) is one detr_fast.ops.add_dropout_layernorm call using the LayerNorm's and the Dropout's
own parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from detr_fast import ops


def add_norm(norm: nn.LayerNorm, dropout: nn.Dropout, x: torch.Tensor, residual: torch.Tensor, fused: bool):
    """Post-norm step norm(residual + dropout(x)), x and residual [..., d]. fused: one
    ops.add_dropout_layernorm call with the modules' own weight, bias, eps and p (same state dict)."""
    if fused:
        return ops.add_dropout_layernorm(x, residual, norm.weight, norm.bias, dropout.p, dropout.training, norm.eps)
    return norm(residual + dropout(x))


class MultiheadAttention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameters, on batch-first tensors.

    query [B, Lq, d], key/value [B, Lk, d], key_padding_mask [B, Lk] bool (True = padded) -> [B, Lq, d].
    """

    def __init__(self, d_model: int, nheads: int, dropout: float = 0.0, impl: str = "fused"):
        super().__init__()
        if d_model % nheads:
            raise ValueError(f"d_model {d_model} is not divisible by nheads {nheads}")
        self.d_model, self.nheads, self.dropout, self.impl = d_model, nheads, dropout, impl
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query, key, value, key_padding_mask=None):
        if self.impl == "reference" or (self.impl == "auto" and not query.is_cuda):
            out, _ = F.multi_head_attention_forward(
                query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), self.d_model, self.nheads,
                self.in_proj_weight, self.in_proj_bias, None, None, False, self.dropout, self.out_proj.weight,
                self.out_proj.bias, training=self.training, key_padding_mask=key_padding_mask, need_weights=False)
            return out.transpose(0, 1)
        B, Lq, d = query.shape
        Lk = key.shape[1]
        H, hd = self.nheads, d // self.nheads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q).view(B, Lq, H, hd).transpose(1, 2)  # [B, H, Lq, hd]
        k = F.linear(key, w_k, b_k).view(B, Lk, H, hd).transpose(1, 2)  # [B, H, Lk, hd]
        v = F.linear(value, w_v, b_v).view(B, Lk, H, hd).transpose(1, 2)
        out = ops.attention(q, k, v, key_padding_mask, self.dropout if self.training else 0.0)  # [B, H, Lq, hd]
        return self.out_proj(out.transpose(1, 2).reshape(B, Lq, d))


class EncoderLayer(nn.Module):
    def __init__(self, d_model, nheads, dim_feedforward, dropout, attn_impl, fused_norm=False):
        super().__init__()
        self.fused_norm = fused_norm
        self.self_attn = MultiheadAttention(d_model, nheads, dropout, attn_impl)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src, mask, pos):
        """src, pos [B, L, d]; mask [B, L]."""
        q = k = src + pos
        src = add_norm(self.norm1, self.dropout1, self.self_attn(q, k, src, mask), src, self.fused_norm)
        ff = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return add_norm(self.norm2, self.dropout2, ff, src, self.fused_norm)


class DecoderLayer(nn.Module):
    def __init__(self, d_model, nheads, dim_feedforward, dropout, attn_impl, fused_norm=False):
        super().__init__()
        self.fused_norm = fused_norm
        self.self_attn = MultiheadAttention(d_model, nheads, dropout, attn_impl)
        self.multihead_attn = MultiheadAttention(d_model, nheads, dropout, attn_impl)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt, memory, memory_mask, pos, query_pos):
        """tgt, query_pos [B, Q, d]; memory, pos [B, L, d]; memory_mask [B, L]."""
        q = k = tgt + query_pos
        tgt = add_norm(self.norm1, self.dropout1, self.self_attn(q, k, tgt), tgt, self.fused_norm)
        tgt2 = self.multihead_attn(tgt + query_pos, memory + pos, memory, memory_mask)
        tgt = add_norm(self.norm2, self.dropout2, tgt2, tgt, self.fused_norm)
        ff = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return add_norm(self.norm3, self.dropout3, ff, tgt, self.fused_norm)


class Encoder(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, src, mask, pos):
        for layer in self.layers:
            src = layer(src, mask, pos)
        return src


class Decoder(nn.Module):
    def __init__(self, layers, d_model):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt, memory, memory_mask, pos, query_pos):
        """-> [L, B, Q, d]: every layer's output through the shared final LayerNorm."""
        outs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_mask, pos, query_pos)
            outs.append(self.norm(tgt))
        return torch.stack(outs)


class Transformer(nn.Module):
    def __init__(self, d_model=256, nheads=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048,
                 dropout=0.1, attn_impl="fused", fused_norm=False):
        super().__init__()
        self.d_model, self.nheads = d_model, nheads
        self.encoder = Encoder([EncoderLayer(d_model, nheads, dim_feedforward, dropout, attn_impl, fused_norm)
                                for _ in range(num_encoder_layers)])
        self.decoder = Decoder([DecoderLayer(d_model, nheads, dim_feedforward, dropout, attn_impl, fused_norm)
                                for _ in range(num_decoder_layers)], d_model)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src, mask, query_embed, pos):
        """src [B, d, h, w] (projected features), mask [B, h, w], query_embed [Q, d], pos [B, d, h, w]
        -> hs [L, B, Q, d]."""
        B = src.shape[0]
        src = src.flatten(2).transpose(1, 2)  # [B, hw, d]
        pos = pos.flatten(2).transpose(1, 2)  # [B, hw, d]
        mask = mask.flatten(1)  # [B, hw]
        query_pos = query_embed.unsqueeze(0).expand(B, -1, -1)  # [B, Q, d]
        memory = self.encoder(src, mask, pos)
        tgt = torch.zeros_like(query_pos)
        return self.decoder(tgt, memory, mask, pos, query_pos)
