"""detr_fast.ops.bias_act: a convolution's bias, an optional residual add and an optional ReLU in one pass.

    out = relu(x + bias[c] + residual)      x, residual [N, C, ...]; bias [C] broadcast over dimension 1

With FrozenBatchNorm folded into the preceding convolution (detr_fast.models.fold), what is left of the norm is a
per-channel bias. Eager PyTorch adds a convolution's bias in a pass of its own, then the ReLU (and at the end of a
ResNet block the residual add and another ReLU) each read and write the whole activation again; this op reads x
(and residual) once and writes out once. The sum is formed in float32 (float64 for float64 x) and rounded once to
x's dtype; bias may be float32 with a low-precision x (autocast keeps the folded shift in float32).

The CUDA kernels are built with fast math, which flushes subnormal floats (|v| < 2^-126) to zero: for such inputs
or sums the CUDA result is 0 where the CPU kernel (and eager PyTorch) keep the subnormal value; everywhere else CPU
and CUDA agree bit for bit.

Layouts: x in contiguous (NCHW) or channels_last form keeps its layout (residual is brought to the same one); any
other strides are made contiguous first.

Backward: d x = d residual = grad_out where out > 0 (everywhere without the ReLU), d bias = its sum over every
dimension but 1 (only computed when bias requires grad). These are torch's own threshold_backward and sum, the
kernels eager PyTorch runs for the same graph; only `out` is saved (with the ReLU), which the next convolution
saves anyway.

Backends: the CUDA kernel, the C++ CPU kernel, and reference.bias_act when the extension is not built.

relu_backward_sum(grad_a, grad_b, out) is a backward helper of the same family: where a ReLU's output feeds two
consumers (a ResNet block's input: its first convolution and its residual), autograd sums their gradients in one
pass and the ReLU's backward masks the sum in another; this op does both in one, bit for bit the same
(model.residual_grad_fusion, detr_fast/models/fold.py). It has no autograd formula of its own: it is called from
backward functions.
"""
from __future__ import annotations


import torch

from detr_fast.ops import reference
from detr_fast.ops._ext import extension_loaded, has_kernel, warn_fallback

_HAS_KERNEL = {dev: has_kernel("bias_act", dev) for dev in ("cpu", "cuda")}
_HAS_SUM_KERNEL = {dev: has_kernel("relu_backward_sum", dev) for dev in ("cpu", "cuda")}


def bias_act(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None,
             relu: bool = True) -> torch.Tensor:
    """relu(x + bias + residual) (relu=False: no activation; residual=None: no residual) in x's dtype.

    x [N, C, ...] float; bias [C] float (x's dtype or float32); residual like x or None.
    """
    if not _HAS_KERNEL.get(x.device.type, False):
        if x.device.type in ("cpu", "cuda"):  # meta tensors (shape tracing, FLOP counts) take the reference quietly
            warn_fallback("bias_act", f"no bias_act kernel built for device {x.device.type}")
        return reference.bias_act(x, bias, residual, relu)
    return torch.ops.detr_fast.bias_act(x, bias, residual, bool(relu))


def relu_backward_sum(grad_a: torch.Tensor, grad_b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(grad_a + grad_b) where out > 0, else 0: torch.ops.aten.threshold_backward(grad_a + grad_b, out, 0) in one
    pass. All three of one shape, floating dtype and device; the result in out's layout (channels_last when out is,
    contiguous otherwise)."""
    if not _HAS_SUM_KERNEL.get(out.device.type, False):
        if out.device.type in ("cpu", "cuda"):
            warn_fallback("relu_backward_sum", f"no relu_backward_sum kernel built for device {out.device.type}")
        return reference.relu_backward_sum(grad_a, grad_b, out)
    return torch.ops.detr_fast.relu_backward_sum(grad_a, grad_b, out)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def bias_grad(grad: torch.Tensor, bias_dtype: torch.dtype) -> torch.Tensor:
    """The gradient of bias_act's bias: grad summed over every dimension but 1, in float32 (float64 for float64
    grad), returned in the bias's dtype."""
    dims = [d for d in range(grad.dim()) if d != 1]
    return grad.sum(dim=dims, dtype=_acc_dtype(grad)).to(bias_dtype)


def _out_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format the kernels give the output: channels_last when x is in it (and not also contiguous)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _register() -> None:
    @torch.library.register_fake("detr_fast::bias_act")
    def _fake(x, bias, residual, relu):
        torch._check(x.dim() >= 2, lambda: "bias_act: x must have shape [N, C, ...]")
        torch._check(bias.dim() == 1 and bias.shape[0] == x.shape[1], lambda: "bias_act: bias must be [C]")
        torch._check(residual is None or residual.shape == x.shape, lambda: "bias_act: residual must be x's shape")
        return torch.empty_like(x, memory_format=_out_format(x))

    def _setup_context(ctx, inputs, output):
        x, bias, residual, relu = inputs
        ctx.relu = relu
        ctx.has_residual = residual is not None
        ctx.bias_dtype = bias.dtype
        if relu:
            ctx.save_for_backward(output)

    def _backward(ctx, grad_out):
        if ctx.relu:
            (out,) = ctx.saved_tensors
            grad = torch.ops.aten.threshold_backward(grad_out, out, 0)
        else:
            grad = grad_out
        grad_bias = bias_grad(grad, ctx.bias_dtype) if ctx.needs_input_grad[1] else None
        grad_residual = grad if ctx.has_residual and ctx.needs_input_grad[2] else None
        return grad, grad_bias, grad_residual, None

    torch.library.register_autograd("detr_fast::bias_act", _backward, setup_context=_setup_context)
    if not hasattr(torch.ops.detr_fast, "relu_backward_sum"):  # an extension built before the op
        return

    @torch.library.register_fake("detr_fast::relu_backward_sum")
    def _fake_sum(grad_a, grad_b, out):
        torch._check(grad_a.shape == out.shape and grad_b.shape == out.shape,
                     lambda: "relu_backward_sum: grad_a, grad_b and out must have one shape")
        torch._check(grad_a.dtype == out.dtype and grad_b.dtype == out.dtype,
                     lambda: "relu_backward_sum: grad_a, grad_b and out must have one dtype")
        return torch.empty_like(out, memory_format=_out_format(out))


if extension_loaded() and hasattr(torch.ops.detr_fast, "bias_act"):
    _register()
