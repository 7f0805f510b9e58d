"""Validation and benchmark cases of detr_fast.ops.relu_dropout (read by the tests, `detr-fast validate` and
benchmarks).

Rule: cases_attention.compare (fp32/fp64 within 1e-5 of the fp64 reference, fp16/bf16 within twice the error of the
reference computed in that precision). Training cases draw the mask from torch's default generator as in training:
`make` seeds the generator, and the check seeds it again, asks the op for the (seed, offset) it draws from that
state, rebuilds the keep mask and compares with the reference given that mask.
"""
from __future__ import annotations

import math

import torch

from detr_fast.ops import reference
from detr_fast.ops.cases_attention import LOW_PRECISION, compare
from detr_fast.ops.registry import Case, register


def references(x, grad_out, p, keep):
    """((out, dx) of the fp64 reference, the same computed in x's precision or None for fp32/fp64) given the keep
    mask (None: no dropout), dx for the incoming gradient grad_out."""

    def ref(dt):
        t = x.detach().to(dt).requires_grad_(True)
        y = reference.relu_dropout(t, p, keep is not None, dropout_mask=keep)
        (g,) = torch.autograd.grad(y, t, grad_out.to(dt)) if y.numel() else (torch.zeros_like(t),)
        return y.detach(), g

    return ref(torch.float64), (ref(x.dtype) if x.dtype in LOW_PRECISION else None)


def _case(name, shape, p=0.1, training=True, dtypes=(torch.float32, torch.float16, torch.bfloat16),
          tags=("cpu_half",)):
    state = {}

    def make(device, dtype, gen):
        x = torch.randn(*shape, generator=gen).to(device, dtype)
        if training and p > 0:
            state["seed"] = int(torch.randint(0, 2**62, (1,), generator=gen))
            torch.manual_seed(state["seed"])  # the op draws its (seed, offset) from this generator state
        return (x,), {"p": p, "training": training}

    def check(out, args, kwargs, dtype):
        from detr_fast.ops.layernorm import dropout_mask, relu_dropout_with_state

        (x,) = args
        keep = None
        if training and p > 0:
            torch.manual_seed(state["seed"])
            rng = relu_dropout_with_state(x, p)[1]
            keep = dropout_mask(rng, math.prod(shape[:-1]), shape[-1], p)
        on = keep is not None
        ref64 = reference.relu_dropout(x.double(), p, on, dropout_mask=keep)
        ref_low = reference.relu_dropout(x, p, on, dropout_mask=keep) if dtype in LOW_PRECISION else None
        if out.dtype != dtype or out.shape != ref64.shape:
            return float("nan"), 0.0
        return compare(out, ref64, ref_low, dtype)

    return register(Case(op="relu_dropout", name=name, make=make, check=check, dtypes=dtypes, tags=tags,
                         grad_args=(0,)))


# Validation: odd rows and widths (4-element groups with a tail), zero rows, 3-D input, eval.
for shape in [(1, 1), (4, 7), (5, 33), (3, 2, 128), (0, 256), (13, 1000), (2, 2050)]:
    _case(f"x={'x'.join(map(str, shape))} p=0.1", shape)
_case("x=9x64 p=0.5", (9, 64), p=0.5)
_case("x=4x256 eval", (4, 256), training=False)

# Benchmark shape: the encoder FFN's hidden activation (B=8 x L=850 tokens, 2048 wide), dropout 0.1.
_case("enc FFN B=8 L=850 d=2048 p=0.1", (8 * 850, 2048), dtypes=(torch.float32, torch.bfloat16), tags=("bench",))
