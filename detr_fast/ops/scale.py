"""detr_fast.ops.scale_many: many tensors scaled per channel, each product rounded once to a given dtype, in one
launch.

    outs = scale_many([w_0, w_1, ...], scale, dtype)     outs[k] = w_k * scale[channels of w_k], in dtype

Dimension 0 of each tensor is its channel (a convolution weight's output channel) and must be outermost in memory
(contiguous, or channels_last 4-D); tensor k's channels follow tensor k-1's in scale (1-D, float32 or float64). Each
output keeps its input's shape and strides. The product is formed in float32 (float64 when an operand or dtype is
float64) and rounded once to dtype: exactly torch.mul(w, s.view(C, 1, ...), out=out).

Its use: with FrozenBatchNorm folded into the trunk's convolutions (detr_fast.models.fold), every trainable weight
is multiplied by its channels' frozen scale in each forward (and its gradient by the same scale in the backward),
under autocast written in the low precision. Per weight that is one broadcast multiply each way, 84 launches per
DETR-R50 step (0.45 ms on an H200, benchmarks/RESULTS.md); scale_many does each direction in one.

Backends: the CUDA kernel, the C++ CPU kernel, and reference.scale_many when the extension is not built.
"""
from __future__ import annotations

import torch

from detr_fast.ops import reference
from detr_fast.ops._ext import extension_loaded, has_kernel, warn_fallback

_HAS_KERNEL = {dev: has_kernel("scale_many", dev) for dev in ("cpu", "cuda")}


def scale_many(xs: list, scale: torch.Tensor, dtype: torch.dtype) -> list:
    """[x * scale[channels of x] in dtype for x in xs] (see the module docstring)."""
    if not _HAS_KERNEL.get(scale.device.type, False):
        if scale.device.type in ("cpu", "cuda"):  # meta and fake tensors take the reference quietly
            warn_fallback("scale_many", f"no scale_many kernel built for device {scale.device.type}")
        return reference.scale_many(xs, scale, dtype)
    return list(torch.ops.detr_fast.scale_many(list(xs), scale, dtype))


class ScaleMany(torch.autograd.Function):
    """scale_many with gradients for the tensors (not for scale, which is frozen where this is used): each
    gradient is the incoming one times the same scale, written in its tensor's dtype, again in one launch.

        outs = ScaleMany.apply(scale, dtype, *xs)
    """

    @staticmethod
    def forward(ctx, scale, dtype, *xs):
        ctx.save_for_backward(scale)
        ctx.in_dtype = xs[0].dtype if xs else dtype
        ctx.out_dtype = dtype
        ctx.shapes = [(x.shape, x.stride()) for x in xs]
        return tuple(scale_many(list(xs), scale, dtype))

    @staticmethod
    def backward(ctx, *grads):
        (scale,) = ctx.saved_tensors
        gs = []
        for g, (shape, stride) in zip(grads, ctx.shapes):
            if g is None:
                g = torch.empty_strided(shape, stride, dtype=ctx.out_dtype, device=scale.device).zero_()
            elif g.stride() != stride:  # the gradient in its tensor's layout (a copy only where it differs)
                g = torch.empty_strided(shape, stride, dtype=g.dtype, device=g.device).copy_(g)
            gs.append(g)
        return (None, None, *scale_many(gs, scale, ctx.in_dtype))


def _register() -> None:
    @torch.library.register_fake("detr_fast::scale_many")
    def _fake(xs, scale, dtype):
        torch._check(scale.dim() == 1 and scale.shape[0] == sum(x.shape[0] for x in xs),
                     lambda: "scale_many: scale must have one value per channel of all tensors")
        return [torch.empty_like(x, dtype=dtype) for x in xs]


if extension_loaded() and hasattr(torch.ops.detr_fast, "scale_many"):
    _register()
