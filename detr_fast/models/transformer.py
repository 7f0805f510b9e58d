"""DETR's post-norm encoder-decoder transformer, batch-first internally.

Parameter names equal those of the official DETR (nn.MultiheadAttention's in_proj_weight / in_proj_bias /
out_proj, linear1/2, norm1/2/3, decoder.norm), so official checkpoints load unchanged. The attention core runs
either detr_fast.ops.attention ("fused") or nn.MultiheadAttention's own math ("reference"); "auto" picks the fused
kernel for CUDA tensors and the reference for CPU tensors. With fused_norm, each post-norm step
norm(residual + dropout(x)) is one detr_fast.ops.add_dropout_layernorm call using the LayerNorm's and the Dropout's
own parameters. With packed_proj (and the fused core), each self-attention projects q and k in one matrix product
(query and key are the same tensor) and the decoder projects the keys and values of all its cross-attentions up
front in two (they all read the same memory): fewer, larger GEMMs and input casts, the same parameters. With
fused_ffn, the FFN's ReLU and dropout are one detr_fast.ops.relu_dropout call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from detr_fast import ops


def ffn_activation(dropout: nn.Dropout, x: torch.Tensor, fused: bool) -> torch.Tensor:
    """The FFN's dropout(relu(x)); fused: one ops.relu_dropout call with the Dropout's own p (its backward needs only
    the output)."""
    if fused:
        return ops.relu_dropout(x, dropout.p, dropout.training)
    return dropout(F.relu(x))


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

    def fused(self, x: torch.Tensor) -> bool:
        """Whether the fused attention core runs for tensors like x (else nn.MultiheadAttention's math)."""
        return not (self.impl == "reference" or (self.impl == "auto" and not x.is_cuda))

    def forward(self, query, key, value, key_padding_mask=None):
        if not self.fused(query):
            out, _ = F.multi_head_attention_forward(
                query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), self.d_model, self.nheads,
                self.in_proj_weight, self.in_proj_bias, None, None, False, self.dropout, self.out_proj.weight,
                self.out_proj.bias, training=self.training, key_padding_mask=key_padding_mask, need_weights=False)
            return out.transpose(0, 1)
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self.heads(F.linear(query, w_q, b_q))  # [B, H, Lq, hd]
        k = self.heads(F.linear(key, w_k, b_k))  # [B, H, Lk, hd]
        v = self.heads(F.linear(value, w_v, b_v))
        return self.attend(q, k, v, key_padding_mask)

    def heads(self, x):
        """[B, L, d] -> [B, H, L, hd] (a view)."""
        B, L, _ = x.shape
        return x.view(B, L, self.nheads, -1).transpose(1, 2)

    def attend(self, q, k, v, key_padding_mask=None):
        """The fused core and the output projection on projected q [B, H, Lq, hd], k/v [B, H, Lk, hd] -> [B, Lq, d]."""
        B, _, Lq, _ = q.shape
        out = ops.attention(q, k, v, key_padding_mask, self.dropout if self.training else 0.0)  # [B, H, Lq, hd]
        return self.out_proj(out.transpose(1, 2).reshape(B, Lq, self.d_model))

    def self_attention(self, x_pos, x, key_padding_mask=None):
        """query = key = x_pos, value = x, all [B, L, d]. With the fused core, q and k come from one matrix product
        over the stacked q/k rows of in_proj_weight (one input cast and one GEMM each way instead of two)."""
        if not self.fused(x_pos):
            return self.forward(x_pos, x_pos, x, key_padding_mask)
        B, L, d = x_pos.shape
        w_qk, w_v = self.in_proj_weight.split([2 * d, d])
        b_qk, b_v = self.in_proj_bias.split([2 * d, d])
        # split, not indexed: the backward joins the two halves' gradients (which arrive in the attention kernels'
        # [B, L, H, hd] layout, as [B, L, d] views) with one concatenation, and indexing would zero-fill a buffer each
        q, k = (self.heads(t) for t in F.linear(x_pos, w_qk, b_qk).split(d, -1))
        return self.attend(q, k, self.heads(F.linear(x, w_v, b_v)), key_padding_mask)


def cross_keys_values(attns: list[MultiheadAttention], memory, pos):
    """Keys and values of several cross-attentions over the same memory, in two matrix products: k = (memory + pos)
    against every module's key rows stacked, v = memory against the value rows stacked.
    -> ([(w_q, b_q, k, v)] per module, k/v [B, H, L, hd] views), each module's query weight and bias split from the
    same in_proj split as its key and value rows (one gradient node per parameter)."""
    d = attns[0].d_model
    ws = [a.in_proj_weight.split(d) for a in attns]
    bs = [a.in_proj_bias.split(d) for a in attns]
    k_all = F.linear(memory + pos, torch.cat([w[1] for w in ws]), torch.cat([b[1] for b in bs]))  # [B, L, n*d]
    v_all = F.linear(memory, torch.cat([w[2] for w in ws]), torch.cat([b[2] for b in bs]))
    return [(w[0], b[0], a.heads(k), a.heads(v))
            for a, w, b, k, v in zip(attns, ws, bs, k_all.split(d, -1), v_all.split(d, -1))]


class EncoderLayer(nn.Module):
    def __init__(self, d_model, nheads, dim_feedforward, dropout, attn_impl, fused_norm=False, packed_proj=False,
                 fused_ffn=False):
        super().__init__()
        self.fused_norm, self.packed_proj, self.fused_ffn = fused_norm, packed_proj, fused_ffn
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
        attn = self.self_attn.self_attention(q, src, mask) if self.packed_proj else self.self_attn(q, k, src, mask)
        src = add_norm(self.norm1, self.dropout1, attn, src, self.fused_norm)
        ff = self.linear2(ffn_activation(self.dropout, self.linear1(src), self.fused_ffn))
        return add_norm(self.norm2, self.dropout2, ff, src, self.fused_norm)


class DecoderLayer(nn.Module):
    def __init__(self, d_model, nheads, dim_feedforward, dropout, attn_impl, fused_norm=False, packed_proj=False,
                 fused_ffn=False):
        super().__init__()
        self.fused_norm, self.packed_proj, self.fused_ffn = fused_norm, packed_proj, fused_ffn
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

    def forward(self, tgt, memory, memory_mask, pos, query_pos, cross=None):
        """tgt, query_pos [B, Q, d]; memory, pos [B, L, d]; memory_mask [B, L]. cross: this layer's (w_q, b_q, k, v)
        from cross_keys_values (packed_proj), else None."""
        q = k = tgt + query_pos
        attn = self.self_attn.self_attention(q, tgt) if self.packed_proj else self.self_attn(q, k, tgt)
        tgt = add_norm(self.norm1, self.dropout1, attn, tgt, self.fused_norm)
        if cross is not None:
            w_q, b_q, k, v = cross
            mha = self.multihead_attn
            tgt2 = mha.attend(mha.heads(F.linear(tgt + query_pos, w_q, b_q)), k, v, memory_mask)
        else:
            tgt2 = self.multihead_attn(tgt + query_pos, memory + pos, memory, memory_mask)
        tgt = add_norm(self.norm2, self.dropout2, tgt2, tgt, self.fused_norm)
        ff = self.linear2(ffn_activation(self.dropout, self.linear1(tgt), self.fused_ffn))
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
        """-> [L, B, Q, d]: every layer's output through the shared final LayerNorm. With packed_proj (and the fused
        attention core) the keys and values of all layers' cross-attentions are projected up front, in two
        matrix products (cross_keys_values)."""
        outs = []
        attns = [layer.multihead_attn for layer in self.layers]
        packed = self.layers and self.layers[0].packed_proj and attns[0].fused(memory)
        crosses = cross_keys_values(attns, memory, pos) if packed else [None] * len(self.layers)
        for layer, cross in zip(self.layers, crosses):
            tgt = layer(tgt, memory, memory_mask, pos, query_pos, cross)
            outs.append(tgt)
        # one LayerNorm over the stacked layers (rows are normalized independently: the same values as one call per
        # layer, in one kernel each way instead of six)
        return self.norm(torch.stack(outs))


class Transformer(nn.Module):
    def __init__(self, d_model=256, nheads=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048,
                 dropout=0.1, attn_impl="fused", fused_norm=False, packed_proj=False, fused_ffn=False):
        super().__init__()
        self.d_model, self.nheads = d_model, nheads
        layer_args = (d_model, nheads, dim_feedforward, dropout, attn_impl, fused_norm, packed_proj, fused_ffn)
        self.encoder = Encoder([EncoderLayer(*layer_args) for _ in range(num_encoder_layers)])
        self.decoder = Decoder([DecoderLayer(*layer_args) for _ in range(num_decoder_layers)], d_model)
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
