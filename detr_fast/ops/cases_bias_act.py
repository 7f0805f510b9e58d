"""Validation and benchmark cases of detr_fast.ops.bias_act (read by the tests, `detr-fast validate` and benchmarks).

Rule (cases_attention.compare, shared with tests/test_bias_act.py): fp32/fp64 within 1e-5 of the fp64 reference,
relative to the largest magnitude of the reference (at least 1); fp16/bf16 within twice the error of the reference
computed in that precision plus the rounding error of 0.3 in that precision. The output must also keep x's dtype,
shape and layout (channels_last in, channels_last out).
"""
from __future__ import annotations

import torch

from detr_fast.ops import reference
from detr_fast.ops.cases_attention import LOW_PRECISION, compare
from detr_fast.ops.registry import Case, register


def make_inputs(shape, device, dtype, gen, residual=True, bias_fp32=False, channels_last=False):
    """x ~ N(0, 1) [*shape] (so about half of relu's inputs are negative), bias ~ N(0, 0.5^2) [C] in dtype or
    float32, residual ~ N(0, 1) like x or None; 4-D tensors in channels_last form when asked."""
    x = torch.randn(*shape, generator=gen)
    bias = 0.5 * torch.randn(shape[1], generator=gen)
    r = torch.randn(*shape, generator=gen) if residual else None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(device, dtype).contiguous(memory_format=fmt)
    r = r.to(device, dtype).contiguous(memory_format=fmt) if r is not None else None
    return x, bias.to(device, torch.float32 if bias_fp32 else dtype), r


def references(x, bias, residual, relu):
    """(fp64 reference, reference computed in x's precision or None for fp32/fp64)."""
    r64 = residual.double() if residual is not None else None
    ref64 = reference.bias_act(x.double(), bias.double(), r64, relu)
    ref_low = reference.bias_act(x, bias, residual, relu) if x.dtype in LOW_PRECISION else None
    return ref64, ref_low


def same_layout(out: torch.Tensor, x: torch.Tensor) -> bool:
    """out has x's layout: channels_last when x is channels_last (and not also contiguous), contiguous otherwise."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return out.is_contiguous(memory_format=torch.channels_last)
    return out.is_contiguous()


def _case(name, shape, residual=True, relu=True, bias_fp32=False, channels_last=False,
          dtypes=(torch.float32, torch.float16, torch.bfloat16), tags=("cpu_half",), devices=("cpu", "cuda")):
    def make(device, dtype, gen):
        x, bias, r = make_inputs(shape, device, dtype, gen, residual, bias_fp32, channels_last)
        return (x, bias, r), {"relu": relu}

    def check(out, args, kwargs, dtype):
        x, bias, r = args
        ref64, ref_low = references(x, bias, r, kwargs["relu"])
        if out.dtype != dtype or out.shape != ref64.shape or not same_layout(out, x):
            return float("nan"), 0.0
        return compare(out, ref64, ref_low, dtype)

    return register(Case(op="bias_act", name=name, make=make, check=check, dtypes=dtypes, devices=devices,
                         tags=tags, grad_args=(0, 2) if residual else (0,)))


# Validation: odd sizes, both layouts (channels_last with C a multiple of the vector width, and not), with and
# without residual and ReLU, a float32 bias with low-precision x (as under autocast), 2-D and 3-D inputs, empty
# batches and empty maps.
for shape, cl in [((2, 3, 5, 7), False), ((2, 3, 5, 7), True), ((3, 16, 9, 11), True), ((1, 64, 13, 1), True),
                  ((5, 24, 3, 3), False), ((4, 37), False), ((2, 8, 33), False), ((0, 16, 4, 4), True),
                  ((2, 16, 0, 5), False)]:
    label = f"x={'x'.join(map(str, shape))}{' cl' if cl else ''}"
    _case(label, shape, channels_last=cl)
    _case(f"{label} no residual", shape, residual=False, channels_last=cl)
_case("x=3x16x9x11 cl no relu", (3, 16, 9, 11), relu=False, channels_last=True)
_case("x=2x5x6x7 no relu no residual", (2, 5, 6, 7), residual=False, relu=False)
_case("x=2x32x7x5 cl bias fp32", (2, 32, 7, 5), bias_fp32=True, channels_last=True)
_case("x=3x12x10x10 bias fp32 no residual", (3, 12, 10, 10), residual=False, bias_fp32=True)

# Benchmark shapes: ResNet-50 activations of DETR's step (batch 8 padded to 800x1333, channels_last, bf16 under
# autocast with the folded shift in float32): a block's end (bias + residual + ReLU) in layer1 and layer3, and
# an inner conv's bias + ReLU in layer1.
for label, shape, res in (("layer1 end", (8, 256, 200, 334), True), ("layer3 end", (8, 1024, 50, 84), True),
                          ("layer1 inner", (8, 64, 200, 334), False)):
    _case(f"{label} {'x'.join(map(str, shape))} cl", shape, residual=res, bias_fp32=True, channels_last=True,
          dtypes=(torch.bfloat16,), tags=("bench",), devices=("cuda",))


# ---- relu_backward_sum: the two gradients of a ResNet block's input summed and masked by the previous block's ReLU
# output. Exact: the output must equal reference.relu_backward_sum computed in the same dtype, bit for bit (error =
# the largest difference, tolerance 0), in out's layout.

def make_sum_inputs(shape, device, dtype, gen, out_cl=False, grads_cl=None):
    """grad_a, grad_b ~ N(0, 1) and out = relu(N(0, 1)) (half of it zeros, as a ReLU's output) [*shape] in dtype;
    4-D out channels_last when asked, the gradients in out's layout unless grads_cl says otherwise."""
    a, b, o = (torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(3))
    grads_cl = out_cl if grads_cl is None else grads_cl

    def place(t, cl):
        return t.to(device, dtype).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    return place(a, grads_cl), place(b, grads_cl), place(o.relu(), out_cl)


def _sum_case(name, shape, out_cl=False, grads_cl=None, dtypes=(torch.float32, torch.float64, torch.float16,
                                                                torch.bfloat16), tags=(), devices=("cpu", "cuda")):
    def make(device, dtype, gen):
        return make_sum_inputs(shape, device, dtype, gen, out_cl, grads_cl), {}

    def check(result, args, kwargs, dtype):
        want = reference.relu_backward_sum(*args)
        if result.dtype != dtype or result.shape != want.shape or not same_layout(result, args[2]):
            return float("inf"), 0.0
        return (float((result.double() - want.double()).abs().max()) if result.numel() else 0.0), 0.0

    return register(Case(op="relu_backward_sum", name=name, make=make, check=check, dtypes=dtypes, tags=tags,
                         devices=devices))


for shape, cl, gcl in [((2, 3, 5, 7), False, None), ((2, 3, 5, 7), True, None), ((3, 16, 9, 11), True, None),
                       ((3, 16, 9, 11), True, False), ((2, 8, 5, 5), False, True), ((4, 37), False, None),
                       ((1001,), False, None), ((0, 16, 4, 4), True, None), ((2, 16, 0, 5), False, None)]:
    grads = "" if gcl is None else f" grads {'cl' if gcl else 'nchw'}"
    _sum_case(f"{'x'.join(map(str, shape))}{' cl' if cl else ''}{grads}", shape, out_cl=cl, grads_cl=gcl)

# Benchmark: the joint inside ResNet-50's layer2 and layer3 of DETR's step (batch 8 padded to 800x1333, bf16,
# channels_last); the reference is the path it replaces, autograd's sum then threshold_backward
for label, shape in (("layer2 joint", (8, 512, 100, 167)), ("layer3 joint", (8, 1024, 50, 84))):
    _sum_case(f"{label} {'x'.join(map(str, shape))} cl", shape, out_cl=True, dtypes=(torch.bfloat16,),
              tags=("bench",), devices=("cuda",))
