"""model.flat_cast: the transformer's and the heads' matrix weights cast to autocast's dtype in one pass per step.

Under bf16 (or fp16) autocast every F.linear and convolution casts its fp32 weight and bias on each call: one small
cast kernel per weight, bias and in_proj chunk in the forward (about 200 in DETR) and one per gradient in the backward
(as many again). With flat_cast, DETR concatenates those parameters once per forward, casts them in one kernel and
lends each module its slice for the duration of the forward; the backward concatenates the low-precision gradients
and casts them back in one kernel. The values are the ones autocast computes: every weight rounded to nearest on its
own, every gradient converted back element by element, and a gradient summed over several uses of one parameter
summed in the low precision, as autocast's weight cache does. Outputs and gradients are therefore bit-identical to
plain autocast (tests/test_flat_cast.py). Without autocast, for parameters that are not float32, or while
torch.compile traces (Inductor fuses the casts itself), nothing changes.

The price is one more copy of these weights each way (the concatenation: about 140 MB forward and 70 MB backward
for DETR's 17 M transformer weights), small next to a GPU's bandwidth and the ~400 launches it removes, but a net
loss on a CPU (benchmarks/RESULTS.md).

One consequence for DistributedDataParallel: the gradients of all these parameters are produced together, when the
backward reaches the input projection (the one cast's backward needs all of its inputs' gradients), so DDP's
all-reduce of them starts there rather than layer by layer.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def autocast_dtype(x: torch.Tensor, t: torch.Tensor) -> torch.dtype:
    """The dtype autocast gives t as an operand of a matrix product or convolution on x's device (t's own dtype
    without autocast, and for tensors autocast leaves alone: not floating point, or float64)."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and t.is_floating_point() and t.dtype != torch.float64 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


def channels_last(t: torch.Tensor) -> bool:
    """A 4-D tensor stored channels_last (and not also plainly contiguous, as 1x1 kernels can be)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def flatten(t: torch.Tensor) -> torch.Tensor:
    """t's elements in its memory order, 1-D (a view when t is dense in its layout; a contiguous 1-D tensor itself,
    as each view is a dispatch of host time of its own). A channels_last weight keeps each output channel's elements
    one contiguous run of fan_in values, as a contiguous one does."""
    if channels_last(t):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t if t.dim() == 1 and t.is_contiguous() else t.reshape(-1)


def unflatten(flat: torch.Tensor, numels: list, shapes: list, cl: list) -> tuple:
    """Views of flat shaped (and strided, channels_last where cl) as the tensors flatten took."""
    out = []
    for v, s, c in zip(flat.split(numels), shapes, cl):
        out.append(v.view(s[0], s[2], s[3], s[1]).permute(0, 3, 1, 2) if c else v if len(s) == 1 else v.view(s))
    return tuple(out)


class _FlatCast(torch.autograd.Function):
    """(dtype, *params) -> the params cast to dtype, as views of one buffer in their own layouts; backward: one
    concatenation and one cast of the incoming gradients."""

    @staticmethod
    def forward(ctx, dtype, *params):
        ctx.meta = ([p.numel() for p in params], [p.shape for p in params], [channels_last(p) for p in params])
        ctx.param_dtype = params[0].dtype
        flat = torch.cat([flatten(p) for p in params]).to(dtype)
        return unflatten(flat, *ctx.meta)

    @staticmethod
    def backward(ctx, *grads):
        flat = torch.cat([flatten(g) for g in grads]).to(ctx.param_dtype)
        return (None, *unflatten(flat, *ctx.meta))


def cast_targets(modules) -> list[tuple[nn.Module, str]]:
    """The (module, parameter name) pairs whose parameters autocast casts to its low precision on every use: the
    weights and biases of nn.Linear and nn.Conv*d, and a MultiheadAttention's in_proj_weight / in_proj_bias (any
    module with those attributes). LayerNorm parameters and embeddings are left alone (autocast runs LayerNorm in
    fp32 and the query embedding is added in fp32)."""
    found, seen = [], set()
    for root in modules:
        for m in root.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                names = ("weight", "bias")
            elif hasattr(m, "in_proj_weight"):
                names = ("in_proj_weight", "in_proj_bias")
            else:
                continue
            for name in names:
                p = m._parameters.get(name)
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    found.append((m, name))
    return found


@contextmanager
def flat_cast(targets: list[tuple[nn.Module, str]]):
    """Within the block, each target parameter is replaced on its module by its autocast-dtype copy, all made by one
    cast (and their gradients returned by one). A no-op when autocast is off for the parameters' device, when the
    parameters are not all float32 on one device, or while torch.compile traces. The parameters are restored on
    exit, also when the block raises."""
    params = [m._parameters[name] for m, name in targets]
    dtype = torch.float32
    if params and not torch.compiler.is_compiling():
        dev = params[0].device
        if all(p.dtype == torch.float32 and p.device == dev for p in params):
            dtype = autocast_dtype(params[0], params[0])
    if dtype == torch.float32:
        yield
        return
    low = _FlatCast.apply(dtype, *params)
    try:
        for (m, name), t in zip(targets, low):
            m._parameters[name] = t
        yield
    finally:
        for (m, name), p in zip(targets, params):
            m._parameters[name] = p
