"""model.bias_grad_mm: each linear layer's bias gradient as a matrix product.

Autograd's backward of F.linear(x, W, b) computes b's gradient as a column sum of the output gradient: one
reduction kernel per layer, over up to [8 images x 1,050 tokens, 2,048] in DETR's encoder. On an H200 the 79 of a
DETR-R50 training step took 1.14 ms (benchmarks/RESULTS.md, 2026-11-27), about ten times what their 0.43 GB take at
that GPU's bandwidth. With bias_grad_mm the backward computes it instead as ones[1, N] @ grad[N, out], a product
with one row that the matrix library streams through like the products beside it, accumulating in fp32 as the
reduction does. The forward is F.linear itself; the input and weight gradients are the two products autograd
computes for it.

Applied to the transformer and the heads (every F.linear there, nn.Linear's included) by a TorchFunctionMode that
DETR.forward enters: nothing in the modules changes, and the state dict is the same. Autocast's rule for linear is
kept: the inputs are cast to its dtype and the product runs in it. While torch.compile traces, the mode stands aside
(Inductor generates its own reductions).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from detr_fast.models import fold
from detr_fast.models.cast import autocast_dtype

# a row of ones per (device, dtype), grown to the largest row count seen and sliced; not made while a CUDA graph is
# captured (a capture makes its own, freed after the backward)
_ONES: dict = {}


def ones_row(n: int, like: torch.Tensor) -> torch.Tensor:
    """[1, n] of ones in like's dtype and device (a view of a kept buffer)."""
    key = (like.device, like.dtype)
    buf = _ONES.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.ones(max(n, 1024), dtype=like.dtype, device=like.device)
        if not fold._capturing(like):
            _ONES[key] = buf
    return buf[:n].view(1, n)


class _LinearBiasGradMM(torch.autograd.Function):
    """F.linear(x, weight, bias) whose backward computes the bias gradient as ones[1, N] @ grad[N, out]."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])  # [N, out]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = g2.mm(weight).view(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            gw = g2.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.needs_input_grad[2]:
            gb = ones_row(g2.shape[0], g2).mm(g2).view(-1)
        return gx, gw, gb


def linear_bias_grad_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight, bias), the bias gradient as a matrix product; under autocast, as autocast runs linear (each
    floating input cast to its dtype, the gradients cast back through those casts)."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        x, weight, bias = (t.to(autocast_dtype(x, t)) for t in (x, weight, bias))
        with torch.autocast(dev, enabled=False):
            return _LinearBiasGradMM.apply(x, weight, bias)
    return _LinearBiasGradMM.apply(x, weight, bias)


class BiasGradMM(TorchFunctionMode):
    """Routes F.linear calls with a bias that needs a gradient through linear_bias_grad_mm."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and torch.is_grad_enabled():
            x = args[0]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if bias is not None and bias.requires_grad:
                return linear_bias_grad_mm(x, weight, bias)
        return func(*args, **kwargs)


@contextmanager
def bias_grad_mm(on: bool):
    """BiasGradMM for the block when `on` (and not while torch.compile traces)."""
    if not on or torch.compiler.is_compiling():
        yield
        return
    with BiasGradMM():
        yield
