"""Validation and benchmark cases of detr_fast.ops.attention (read by the tests, `detr-fast validate` and benchmarks).

Rule (shared with tests/test_attention.py through `compare`): fp32/fp64 within 1e-5 of the fp64 reference, relative
to the largest magnitude of the reference tensor (at least 1); fp16/bf16 within twice the error of the reference
computed in that precision, plus the rounding error of a value of 0.3 in that precision (so that a case whose
reference is exact in low precision, e.g. a single key, does not demand an exact result).
"""
from __future__ import annotations

import torch

from detr_fast.ops import reference
from detr_fast.ops.registry import Case, register

LOW_PRECISION = (torch.float16, torch.bfloat16)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def low_precision_floor(dtype: torch.dtype) -> float:
    """Rounding error of 0.3 in `dtype` (the absolute floor of the low-precision rule)."""
    x = torch.tensor(0.3, dtype=torch.float64)
    return abs(x.to(dtype).double().item() - 0.3)


def compare(ours: torch.Tensor, ref64: torch.Tensor, ref_low: torch.Tensor | None, dtype: torch.dtype):
    """(error, tolerance) of one output or gradient by the rule above. NaN anywhere in `ours` gives error NaN."""
    if ours.numel() and not torch.isfinite(ours).all():
        return float("nan"), 0.0
    err = max_err(ours, ref64)
    if dtype in LOW_PRECISION:
        tol = 2.0 * max_err(ref_low, ref64) + low_precision_floor(dtype)
    else:
        scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
        tol = 1e-5 * scale
    return err, tol


def make_inputs(B, H, Lq, Lk, D, device, dtype, gen, lengths=None, full_pad=()):
    """q [B, H, Lq, D], k/v [B, H, Lk, D] ~ N(0, 1) and key_padding_mask [B, Lk] (None when lengths is None).

    lengths: "random" (each image keeps 1..Lk keys) or a list of kept lengths; images in full_pad are fully padded.
    """
    q = torch.randn(B, H, Lq, D, generator=gen)
    k = torch.randn(B, H, Lk, D, generator=gen)
    v = torch.randn(B, H, Lk, D, generator=gen)
    mask = None
    if lengths is not None:
        if lengths == "random":
            lens = torch.randint(1, max(Lk, 1) + 1, (B,), generator=gen)
        else:
            lens = torch.tensor(lengths)
        mask = torch.arange(Lk)[None, :] >= lens[:, None]
        for b in full_pad:
            mask[b] = True
        mask = mask.to(device)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), mask


def _check(out, args, kwargs, dtype):
    """Forward-only check for the registry (tests also check the gradients)."""
    q, k, v, mask = args
    p = kwargs.get("dropout_p", 0.0)
    assert p == 0.0, "registry cases run without dropout (random masks cannot be compared)"
    ref64 = reference.attention(q.double(), k.double(), v.double(), mask)
    ref_low = reference.attention(q, k, v, mask) if dtype in LOW_PRECISION else None
    return compare(out, ref64, ref_low, dtype)


def _maker(B, H, Lq, Lk, D, lengths=None, full_pad=()):
    def make(device, dtype, gen):
        q, k, v, mask = make_inputs(B, H, Lq, Lk, D, device, dtype, gen, lengths, full_pad)
        return (q, k, v, mask), {}
    return make


ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Validation cases: odd lengths, per-image padding, a fully padded image, both head dims.
for (B, H, Lq, Lk, D, lengths, full_pad) in [
    (2, 2, 7, 7, 32, None, ()),
    (1, 1, 1, 1, 32, None, ()),
    (3, 2, 97, 97, 64, "random", (1,)),
    (2, 8, 100, 130, 32, [130, 61], ()),
    (1, 2, 1025, 33, 32, "random", ()),
]:
    register(Case(op="attention", name=f"B={B} H={H} Lq={Lq} Lk={Lk} D={D} mask={lengths is not None}",
                  make=_maker(B, H, Lq, Lk, D, lengths, full_pad), check=_check, dtypes=ALL_DTYPES,
                  tags=("cpu_half",), grad_args=(0, 1, 2)))

# Benchmark shapes of DETR (8 heads of 32): encoder self-attention over the image tokens, decoder self-attention
# over the 100 queries, decoder cross-attention from the queries to the image tokens. Masks pad each image to a
# different length (DETR's batches pad images to the largest one).
_BENCH = []
for B in (2, 8):
    for L in (850, 1050):
        _BENCH += [(f"enc self B={B} L={L}", B, L, L, m) for m in (False, True)]
_BENCH += [("dec self B=8 100x100", 8, 100, 100, False)]
_BENCH += [(f"cross B=8 100x1050", 8, 100, 1050, m) for m in (False, True)]
for name, B, Lq, Lk, masked in _BENCH:
    lengths = [Lk - (37 * b) % (Lk // 3) for b in range(B)] if masked else None
    register(Case(op="attention", name=f"{name}{' mask' if masked else ''}",
                  make=_maker(B, 8, Lq, Lk, 32, lengths), check=_check, dtypes=(torch.float32, torch.bfloat16),
                  devices=("cuda",), tags=("bench",), grad_args=(0, 1, 2)))
