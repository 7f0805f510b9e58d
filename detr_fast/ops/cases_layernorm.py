"""Validation and benchmark cases of detr_fast.ops.add_dropout_layernorm (read by the tests, `detr-fast validate` and
benchmarks).

Rule (cases_attention.compare, shared with tests/test_layernorm.py): fp32/fp64 within 1e-5 of the fp64 reference,
relative to the largest magnitude of the reference (at least 1); fp16/bf16 within twice the error of the reference
computed in that precision plus the rounding error of 0.3 in that precision.

Cases with dropout (training, p > 0) draw the mask from torch's default generator as in training: `make` seeds the
generator, and the check seeds it again, asks the op for the (seed, offset) it draws from that state, rebuilds the
keep mask and compares the output with the reference given that mask.
"""
from __future__ import annotations

import math

import torch

from detr_fast.ops import reference
from detr_fast.ops.cases_attention import LOW_PRECISION, compare
from detr_fast.ops.registry import Case, register


def make_inputs(shape, device, dtype, gen, param_dtype=None):
    """x, residual [*shape] ~ N(0, 1) (residual offset by 2, as a residual stream's mean is rarely 0), weight ~ 1 +
    N(0, 0.1^2) and bias ~ N(0, 0.1^2) [d] in param_dtype (default: dtype)."""
    d = shape[-1]
    x = torch.randn(*shape, generator=gen)
    residual = torch.randn(*shape, generator=gen) + 2.0
    weight = 1.0 + 0.1 * torch.randn(d, generator=gen)
    bias = 0.1 * torch.randn(d, generator=gen)
    pd = param_dtype or dtype
    return x.to(device, dtype), residual.to(device, dtype), weight.to(device, pd), bias.to(device, pd)


def references(x, residual, weight, bias, p, eps, keep):
    """(fp64 reference, reference computed in x's precision or None for fp32/fp64) given keep [rows, d] or None."""
    training = keep is not None
    ref64 = reference.add_dropout_layernorm(x.double(), residual.double(), weight.double(), bias.double(), p,
                                            training, eps, dropout_mask=keep)
    ref_low = None
    if x.dtype in LOW_PRECISION:
        ref_low = reference.add_dropout_layernorm(x, residual, weight.to(x.dtype), bias.to(x.dtype), p, training,
                                                  eps, dropout_mask=keep)
    return ref64, ref_low


def _case(name, shape, p=0.0, training=False, param_fp32=False, dtypes=(torch.float32, torch.float16,
                                                                        torch.bfloat16), tags=("cpu_half",),
          devices=("cpu", "cuda")):
    state = {}

    def make(device, dtype, gen):
        x, residual, weight, bias = make_inputs(shape, device, dtype, gen, torch.float32 if param_fp32 else None)
        if training and p > 0:
            state["seed"] = int(torch.randint(0, 2**62, (1,), generator=gen))
            torch.manual_seed(state["seed"])  # the op draws its (seed, offset) from this generator state
        return (x, residual, weight, bias), {"p": p, "training": training, "eps": 1e-5}

    def check(out, args, kwargs, dtype):
        from detr_fast.ops.layernorm import add_dropout_layernorm_with_state, dropout_mask

        x, residual, weight, bias = args
        keep = None
        if training and p > 0:
            torch.manual_seed(state["seed"])
            rng = add_dropout_layernorm_with_state(x, residual, weight, bias, p, 1e-5)[3]
            keep = dropout_mask(rng, math.prod(shape[:-1]), shape[-1], p)
        ref64, ref_low = references(x, residual, weight, bias, p, 1e-5, keep)
        if out.dtype != dtype or out.shape != ref64.shape:
            return float("nan"), 0.0
        return compare(out, ref64, ref_low, dtype)

    return register(Case(op="add_dropout_layernorm", name=name, make=make, check=check, dtypes=dtypes,
                         devices=devices, tags=tags, grad_args=(0, 1, 2, 3)))


# Validation: odd d (warp per row up to 1024, block per row above), odd and zero row counts, 3-D inputs, fp32
# parameters with low-precision inputs, dropout from the generator.
for shape in [(1, 1), (7, 7), (5, 33), (3, 2, 128), (0, 256), (13, 1000), (3, 1536), (2, 4100)]:
    _case(f"x={'x'.join(map(str, shape))}", shape)
_case("x=9x256 params fp32", (9, 256), param_fp32=True)
_case("x=11x100 p=0.1 train", (11, 100), p=0.1, training=True)
_case("x=6x256 p=0.3 train params fp32", (6, 256), p=0.3, training=True, param_fp32=True)
_case("x=4x256 p=0.1 eval", (4, 256), p=0.1, training=False)

# Benchmark shapes of DETR's post-norm steps (d = 256, dropout 0.1 in training): encoder tokens B=8 x L=850 and
# decoder queries B=8 x 100; parameters fp32 as under autocast.
for label, rows in (("enc B=8 L=850", 8 * 850), ("dec B=8 Q=100", 8 * 100)):
    _case(f"{label} d=256 p=0.1 train", (rows, 256), p=0.1, training=True, param_fp32=True,
          dtypes=(torch.float32, torch.bfloat16), tags=("bench",))
_case("enc B=8 L=850 d=256 eval", (8 * 850, 256), param_fp32=True, dtypes=(torch.float32, torch.bfloat16),
      tags=("bench",))
