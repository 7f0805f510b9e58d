"""Fused multi-head attention with key padding mask and dropout (kernels in csrc/attention).

    out = attention(q, k, v, key_padding_mask=None, dropout_p=0.0)

q [B, H, Lq, D], k and v [B, H, Lk, D], key_padding_mask [B, Lk] bool (True = padded key, never attended),
out [B, H, Lq, D] in q's dtype; softmax scale D ** -0.5, fp32 accumulation (fp64 for fp64 inputs on the CPU).
The kernels lay out out (and the gradients of q, k, v) as [B, Lq, H, D] in memory: out.transpose(1, 2) is the
[B, Lq, H * D] input of the output projection without a copy, and a gradient arriving in that layout is read as it
is.
A query whose keys are all padded gets output 0 and zero gradients, as in reference.attention.

Backends: the CUDA kernels (head dims 32 and 64; fp32, fp16, bf16 with tensor cores for fp16/bf16), the C++ CPU
kernel (any head dim, fp32/fp64/fp16/bf16) and reference.attention for anything else (with a one-time warning).
Under autocast, fp32 inputs run in the autocast dtype.

Dropout acts on the attention weights: a weight is kept with probability 1 - dropout_p and scaled by
1 / (1 - dropout_p). The keep decisions come from a counter-based Philox stream keyed by (seed, offset) and the
element's (b, h, i, j) index (csrc/common/philox.h), so the backward can regenerate the forward's mask. The
tensor-core CUDA forward (fp16/bf16) instead saves the keep flags it drew, one bit per weight, after (seed, offset)
in rng_state (9 MB for DETR's encoder at batch 8), and the backward reads them: the two backward kernels would
otherwise draw every flag again, each (the Philox rounds cost more than the softmax arithmetic at head dim 32). The
values are the same either way; DETR_FAST_ATTN_KEEP_BITS=0 in the environment turns the saving off. Without an explicit seed, (seed, offset) are drawn from the device's default torch generator: on CUDA
the generator's seed and a reserved offset range (philox_cuda_state, no host sync, CUDA-graph safe); on the CPU a
seed drawn from the CPU generator. torch.manual_seed therefore makes runs reproducible. `attention_with_state`
returns the (seed, offset) used, and `dropout_mask` rebuilds the keep mask from it.

The op detr_fast::attention returns (out, lse, rng_state, out_f32); the backward (detr_fast::attention_backward,
FlashAttention-2 style: probabilities recomputed tile by tile from lse, no atomics, deterministic) takes out_f32,
the unrounded fp32 output, for fp16/bf16 inputs so that rowsum(grad_out * out) carries no output rounding.
"""
from __future__ import annotations

import os

import torch

from detr_fast.ops import reference
from detr_fast.ops._ext import extension_loaded, has_kernel, warn_fallback

CUDA_HEAD_DIMS = (32, 64)

_HAS_KERNEL = {dev: has_kernel("attention", dev) for dev in ("cpu", "cuda")}


def _fallback_reason(q: torch.Tensor) -> str | None:
    """Why the fused kernel cannot take q (None when it can)."""
    dev = q.device.type
    if not _HAS_KERNEL.get(dev, False):
        return f"no attention kernel built for device {dev}"
    if dev == "cuda":
        if q.shape[-1] not in CUDA_HEAD_DIMS:
            return f"head dim {q.shape[-1]} on CUDA (fused kernels take {CUDA_HEAD_DIMS})"
        if q.dtype == torch.float64:
            return "float64 on CUDA (fused kernels take fp32, fp16, bf16)"
    return None


def _autocast(*ts: torch.Tensor) -> tuple:
    """Cast fp32 tensors to the autocast dtype when autocast is on for their device."""
    dev = ts[0].device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return tuple(t.to(dt) if t.dtype == torch.float32 else t for t in ts)
    return ts


def attention(q, k, v, key_padding_mask=None, dropout_p=0.0):
    """Scaled dot-product attention over heads.

    q [B, H, Lq, D], k/v [B, H, Lk, D], key_padding_mask [B, Lk] bool or None, dropout_p in [0, 1)
    -> [B, H, Lq, D]. Differentiable in q, k, v.
    """
    if q.dim() == 4 and k.dim() == 4 and v.dim() == 4:
        q, k, v = _autocast(q, k, v)
    reason = _fallback_reason(q) if q.dim() == 4 else None
    if reason is not None:
        warn_fallback("attention", reason)
        return reference.attention(q, k, v, key_padding_mask, dropout_p)
    return torch.ops.detr_fast.attention(q, k, v, key_padding_mask, float(dropout_p))[0]


def attention_with_state(q, k, v, key_padding_mask=None, dropout_p=0.0, seed=None, offset=0):
    """The kernel op itself: -> (out [B, H, Lq, D], lse [B, H, Lq], rng_state int64 = (seed, offset) and, from the
    tensor-core CUDA forward with dropout, the keep flags it saved for the backward: rng_state[:2] is the stream).

    Differentiable in q, k, v through `out` (lse is not differentiable). With `seed` given, dropout uses the
    stream (seed, offset) instead of drawing from the generator (deterministic; for tests and opcheck).
    """
    return torch.ops.detr_fast.attention(q, k, v, key_padding_mask, float(dropout_p), seed, offset)[:3]


def dropout_mask(rng_state, B: int, H: int, Lq: int, Lk: int, dropout_p: float) -> torch.Tensor:
    """keep [B, H, Lq, Lk] bool (True = kept): the dropout mask the kernels apply for rng_state, on its device."""
    return torch.ops.detr_fast.attention_dropout_mask(rng_state, B, H, Lq, Lk, float(dropout_p))


def empty_blhd(like: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    """An uninitialized [B, H, L, D] tensor laid out [B, L, H, D], the layout of the kernels' outputs and gradients:
    out.transpose(1, 2) is then the [B, L, H * D] input of the output projection (a view), and the gradient the
    projection returns needs no reordering either."""
    B, H, L, D = shape
    return like.new_empty((B, L, H, D), dtype=dtype or like.dtype).transpose(1, 2)


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def keep_bits_enabled() -> bool:
    """Whether the tensor-core CUDA forward saves its dropout flags (csrc/attention/attention_common.h reads the
    same variable)."""
    return os.environ.get("DETR_FAST_ATTN_KEEP_BITS", "1") != "0"


def rng_state_numel(q: torch.Tensor, k: torch.Tensor, dropout_p: float) -> int:
    """The length of the rng_state the forward returns for these inputs: 2, plus one int64 per (b, h, query row,
    64-key tile) where the tensor-core CUDA kernels save their dropout flags."""
    if not (dropout_p > 0 and q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)
            and keep_bits_enabled()):
        return 2
    B, H, Lq, _ = q.shape
    return 2 + B * H * Lq * ((k.shape[2] + 63) // 64)


def _register() -> None:
    @torch.library.register_fake("detr_fast::attention")
    def _attention_fake(q, k, v, key_padding_mask, dropout_p, seed=None, offset=0):
        torch._check(q.dim() == 4 and k.dim() == 4 and k.shape == v.shape, lambda: "attention: bad shapes")
        B, H, Lq, _ = q.shape
        low = q.dtype in (torch.float16, torch.bfloat16)
        return (empty_blhd(q, q.shape), q.new_empty((B, H, Lq), dtype=_lse_dtype(q)),
                q.new_empty((rng_state_numel(q, k, dropout_p),), dtype=torch.int64),
                empty_blhd(q, q.shape, torch.float32) if low else q.new_empty((0,), dtype=torch.float32))

    @torch.library.register_fake("detr_fast::attention_backward")
    def _attention_backward_fake(grad_out, q, k, v, out, lse, key_padding_mask, dropout_p, rng_state):
        return empty_blhd(q, q.shape), empty_blhd(k, k.shape), empty_blhd(v, v.shape)

    @torch.library.register_fake("detr_fast::attention_dropout_mask")
    def _dropout_mask_fake(rng_state, B, H, Lq, Lk, dropout_p):
        return rng_state.new_empty((B, H, Lq, Lk), dtype=torch.bool)

    def _setup_context(ctx, inputs, output):
        q, k, v, key_padding_mask, dropout_p = inputs[:5]
        out, lse, rng_state, out_f32 = output
        # The backward's rowsum(grad_out * out) reads the unrounded output: out_f32 for fp16/bf16, else out.
        low = q.dtype in (torch.float16, torch.bfloat16)
        ctx.save_for_backward(q, k, v, out_f32 if low else out, lse, rng_state, key_padding_mask)
        ctx.dropout_p = dropout_p
        # only `out` is differentiable: autograd then passes no zero-filled gradients for the others (three
        # kernel launches per call saved in every backward)
        ctx.mark_non_differentiable(lse, rng_state, out_f32)
        ctx.set_materialize_grads(False)

    def _backward(ctx, grad_out, grad_lse, grad_rng, grad_out_f32):
        # Only `out` is differentiable: lse, rng_state and out_f32 are auxiliary outputs for the backward.
        q, k, v, out, lse, rng_state, key_padding_mask = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(q)
        dq, dk, dv = torch.ops.detr_fast.attention_backward(grad_out, q, k, v, out, lse, key_padding_mask,
                                                            ctx.dropout_p, rng_state)
        return dq, dk, dv, None, None, None, None

    torch.library.register_autograd("detr_fast::attention", _backward, setup_context=_setup_context)


if extension_loaded():
    _register()
