"""Fused residual add + dropout + LayerNorm, the post-norm step of DETR's transformer (kernels in csrc/layernorm).

    out = add_dropout_layernorm(x, residual, weight, bias, p, training, eps=1e-5)
        = layer_norm(residual + dropout(x, p, training), [d], weight, bias, eps)

x and residual [..., d] of one dtype (fp32, fp64, fp16, bf16), or "mixed": an fp16/bf16 x with an fp32 residual
(autocast's residual stream; the kernels read x in its own dtype); weight and bias [d] in x's dtype or fp32 (under
autocast DETR keeps LayerNorm parameters fp32); out [..., d] in the residual's dtype; the gradient of x in x's
dtype, of the residual in the residual's. Mean and variance (biased, as in
F.layer_norm) are accumulated in fp32 (fp64 for fp64 inputs); with p == 0 or training False the result is
F.layer_norm(residual + x) up to the order of the fp32 sums. Differentiable in x, residual, weight and bias.

Dropout keeps an element of x with probability 1 - p and scales it by 1 / (1 - p). The keep decisions come from a
counter-based Philox stream keyed by (seed, offset) and the element's (row, column) in x viewed as [rows, d]
(csrc/common/layernorm_math.h), so the backward regenerates the forward's mask instead of storing it. Without an
explicit seed, (seed, offset) are drawn from the device's default torch generator (on CUDA a reserved offset range,
no host sync, CUDA-graph safe; on the CPU a fresh seed from the CPU generator), so torch.manual_seed makes runs
reproducible. `add_dropout_layernorm_with_state` returns the (seed, offset) used and `dropout_mask` rebuilds the
keep mask from it.

Autocast: the plain path `norm(residual + dropout(x))` adds in the promoted dtype and autocast runs layer_norm in
fp32 with an fp32 result. The op does the same: under autocast for the inputs' device an fp16/bf16 residual is cast
to fp32, and an fp16/bf16 x goes to the kernel as it is (mixed: the same values as casting it first, one pass fewer
each way); the result is fp32.

Backends: the CUDA kernel (d <= 8192; a warp per row up to d = 1024, a block per row above), the C++ CPU kernel
(any d) and reference.add_dropout_layernorm for anything else (with a one-time warning).
"""
from __future__ import annotations

import math

import torch

from detr_fast.ops import reference
from detr_fast.ops._ext import extension_loaded, has_kernel, warn_fallback

CUDA_MAX_D = 8192

_HAS_KERNEL = {dev: has_kernel("add_dropout_layernorm", dev) for dev in ("cpu", "cuda")}
_HAS_RELU_DROPOUT = {dev: has_kernel("relu_dropout", dev) for dev in ("cpu", "cuda")}
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _fallback_reason(x: torch.Tensor) -> str | None:
    """Why the kernel cannot take x (None when it can)."""
    dev = x.device.type
    if not _HAS_KERNEL.get(dev, False):
        return f"no add_dropout_layernorm kernel built for device {dev}"
    if dev == "cuda" and x.dim() >= 1 and x.shape[-1] > CUDA_MAX_D:
        return f"d = {x.shape[-1]} on CUDA (the kernel takes d <= {CUDA_MAX_D})"
    return None


def _autocast(x: torch.Tensor, residual: torch.Tensor) -> tuple:
    """Under autocast for x's device (autocast runs layer_norm in fp32): an fp16/bf16 residual to fp32; an fp16/bf16
    x stays as it is (the mixed case), any other x dtype is left to the dtype checks."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev) and residual.dtype in LOW_PRECISION:
        residual = residual.float()
    return x, residual


def add_dropout_layernorm(x, residual, weight, bias, p: float = 0.0, training: bool = False, eps: float = 1e-5):
    """layer_norm(residual + dropout(x)) over the last dimension.

    x, residual [..., d]; weight, bias [d]; p in [0, 1) (dropout acts only when training) -> [..., d] in the
    residual's dtype (x's, except for an fp16/bf16 x with an fp32 residual).
    """
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"add_dropout_layernorm: dropout probability p must lie in [0, 1), got {p}")
    x, residual = _autocast(x, residual)
    p_eff = p if training else 0.0
    reason = _fallback_reason(x)
    if reason is not None:
        warn_fallback("add_dropout_layernorm", reason)
        return reference.add_dropout_layernorm(x, residual, weight, bias, p_eff, p_eff > 0, eps)
    return torch.ops.detr_fast.add_dropout_layernorm(x, residual, weight, bias, p_eff, float(eps))[0]


def add_dropout_layernorm_with_state(x, residual, weight, bias, p: float = 0.0, eps: float = 1e-5, seed=None,
                                     offset: int = 0):
    """The kernel op itself (dropout active whenever p > 0):
    -> (out [..., d], mean [rows], rstd [rows], rng_state [2] int64 = (seed, offset)), rows = x.numel() / d.

    Differentiable in x, residual, weight, bias through `out`. With `seed` given, dropout uses the stream
    (seed, offset) instead of drawing from the generator (deterministic; for tests, gradcheck and opcheck).
    """
    return torch.ops.detr_fast.add_dropout_layernorm(x, residual, weight, bias, float(p), float(eps), seed, offset)


def dropout_mask(rng_state: torch.Tensor, rows: int, d: int, p: float) -> torch.Tensor:
    """keep [rows, d] bool (True = kept): the mask the kernels apply to x viewed as [rows, d], on rng_state's
    device."""
    return torch.ops.detr_fast.add_dropout_layernorm_mask(rng_state, rows, d, float(p))


def relu_dropout(x: torch.Tensor, p: float = 0.0, training: bool = False) -> torch.Tensor:
    """dropout(relu(x), p) in one pass: the transformer FFN's activation. -> x's shape and dtype.

    The keep mask is the add_dropout_layernorm stream with x viewed as [rows, d] (`dropout_mask` rebuilds it from the
    rng_state of relu_dropout_with_state); the backward needs only the output (grad / (1 - p) where it is positive,
    else 0), so it regenerates nothing. Without training or with p == 0 it is torch.relu(x)."""
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"relu_dropout: dropout probability p must lie in [0, 1), got {p}")
    if not training or p == 0.0:
        return torch.relu(x)
    dev = x.device.type
    if not _HAS_RELU_DROPOUT.get(dev, False):
        warn_fallback("relu_dropout", f"no relu_dropout kernel built for device {dev}")
        return reference.relu_dropout(x, p, True)
    return torch.ops.detr_fast.relu_dropout(x, p)[0]


def relu_dropout_with_state(x: torch.Tensor, p: float, seed=None, offset: int = 0):
    """The kernel op itself (dropout active whenever p > 0): -> (out, rng_state [2] int64 = (seed, offset)).
    Differentiable in x through out. With `seed` given, the stream (seed, offset) is used instead of the generator."""
    return torch.ops.detr_fast.relu_dropout(x, float(p), seed, offset)


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _register() -> None:
    @torch.library.register_fake("detr_fast::add_dropout_layernorm")
    def _fake(x, residual, weight, bias, p, eps, seed=None, offset=0):
        torch._check(x.dim() >= 1 and residual.shape == x.shape, lambda: "add_dropout_layernorm: bad shapes")
        rows = math.prod(x.shape[:-1])
        acc = _acc_dtype(x)
        return (residual.new_empty(x.shape), x.new_empty((rows,), dtype=acc), x.new_empty((rows,), dtype=acc),
                x.new_empty((2,), dtype=torch.int64))

    @torch.library.register_fake("detr_fast::add_dropout_layernorm_backward")
    def _backward_fake(grad_out, x, residual, weight, mean, rstd, p, rng_state):
        return x.new_empty(x.shape), residual.new_empty(x.shape), weight.new_empty(weight.shape), \
            weight.new_empty(weight.shape)

    @torch.library.register_fake("detr_fast::add_dropout_layernorm_mask")
    def _mask_fake(rng_state, rows, d, p):
        return rng_state.new_empty((rows, d), dtype=torch.bool)

    def _setup_context(ctx, inputs, output):
        x, residual, weight, bias, p = inputs[:5]
        _, mean, rstd, rng_state = output
        ctx.save_for_backward(x, residual, weight, mean, rstd, rng_state)
        ctx.p = p
        # only `out` is differentiable: autograd then passes no zero-filled gradients for the others
        ctx.mark_non_differentiable(mean, rstd, rng_state)
        ctx.set_materialize_grads(False)

    def _backward(ctx, grad_out, grad_mean, grad_rstd, grad_rng):
        # Only `out` is differentiable: mean, rstd and rng_state are saved for the backward.
        x, residual, weight, mean, rstd, rng_state = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(residual)
        dx, dres, dw, db = torch.ops.detr_fast.add_dropout_layernorm_backward(grad_out, x, residual, weight, mean,
                                                                              rstd, ctx.p, rng_state)
        return dx, dres, dw, db, None, None, None, None

    torch.library.register_autograd("detr_fast::add_dropout_layernorm", _backward, setup_context=_setup_context)

    @torch.library.register_fake("detr_fast::relu_dropout")
    def _relu_dropout_fake(x, p, seed=None, offset=0):
        torch._check(x.dim() >= 1, lambda: "relu_dropout: x must have at least one dimension")
        return x.new_empty(x.shape), x.new_empty((2,), dtype=torch.int64)

    @torch.library.register_fake("detr_fast::relu_dropout_backward")
    def _relu_dropout_backward_fake(grad_out, out, p):
        return out.new_empty(out.shape)

    def _relu_setup_context(ctx, inputs, output):
        out, rng_state = output
        ctx.save_for_backward(out)  # the output alone gives the gradient
        ctx.p = inputs[1]
        ctx.mark_non_differentiable(rng_state)
        ctx.set_materialize_grads(False)

    def _relu_backward(ctx, grad_out, grad_rng):
        (out,) = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None
        return torch.ops.detr_fast.relu_dropout_backward(grad_out, out, ctx.p), None, None, None

    torch.library.register_autograd("detr_fast::relu_dropout", _relu_backward, setup_context=_relu_setup_context)


if extension_loaded() and hasattr(torch.ops.detr_fast, "add_dropout_layernorm"):
    _register()
