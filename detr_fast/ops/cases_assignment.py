"""Validation and benchmark cases of linear_assignment (registry: detr_fast.ops.registry).

Cost families (shared with tests/test_assignment.py through `make_costs`): "uniform" U(0, 1); "detr" DETR's matching
cost of random logits and boxes (reference.matching_cost); "ties" integers 0..4; "wide" 10**U(-6, 6); "dup" uniform
costs with duplicated target columns and query rows. A case passes when every assignment is a valid one-to-one
matching of the real targets and its total cost (float64 on the same costs) is within 1e-6 of scipy's, relative to
the sum of the absolute matched costs.
"""
from __future__ import annotations

import numpy as np
import torch

from detr_fast.ops import reference
from detr_fast.ops.registry import Case, register

FAMILIES = ("uniform", "detr", "ties", "wide", "dup")
REL_TOL = 1e-6


def make_costs(family: str, shape: tuple, num_targets: torch.Tensor, gen: torch.Generator,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random costs [*, B, Q, T] of one family on the CPU; padded columns t >= num_targets[b] hold +inf."""
    *lead, B, Q, T = shape
    if family == "uniform":
        c = torch.rand(shape, generator=gen, dtype=torch.float64)
    elif family == "ties":
        c = torch.randint(0, 5, shape, generator=gen).double()
    elif family == "wide":
        c = 10.0 ** (torch.rand(shape, generator=gen, dtype=torch.float64) * 12 - 6)
    elif family == "dup":
        c = torch.rand(shape, generator=gen, dtype=torch.float64)
        if T > 1:  # copy target columns onto others
            src = torch.randint(0, T, (T,), generator=gen)
            keep = torch.rand(T, generator=gen) < 0.5
            c = torch.where(keep, c, c[..., src])
        if Q > 1:  # copy query rows onto others
            src = torch.randint(0, Q, (Q,), generator=gen)
            keep = torch.rand(Q, 1, generator=gen) < 0.5
            c = torch.where(keep, c, c[..., src, :])
    elif family == "detr":
        C = 92
        logits = torch.randn((*lead, B, Q, C), generator=gen) * 3
        pred = torch.rand((*lead, B, Q, 4), generator=gen) * 0.6 + 0.2
        boxes = torch.rand((B, T, 4), generator=gen) * 0.6 + 0.2
        labels = torch.randint(0, C - 1, (B, T), generator=gen)
        full = torch.full((B,), T, dtype=torch.int64)
        c = reference.matching_cost(logits.double(), pred.double(), labels, boxes.double(), full)
    else:
        raise ValueError(f"unknown cost family {family!r}")
    c = c.to(dtype)
    valid = torch.arange(T)[None, :] < num_targets[:, None]  # [B, T]
    return c.masked_fill(~valid[:, None, :], float("inf"))


def totals(cost: torch.Tensor, num_targets: torch.Tensor, assignment: torch.Tensor):
    """Check validity and return (ours, scipy's, sum |matched|) per problem in float64, flattened over [*, B].

    Raises AssertionError for an invalid assignment (a target matched twice or not at all, a padded target used).
    """
    from scipy.optimize import linear_sum_assignment

    B, Q, T = cost.shape[-3:]
    # sync: a validation check, not a training path: scipy needs the costs on the host
    c = cost.detach().cpu().double().reshape(-1, B, Q, T).numpy()
    a = assignment.detach().cpu().reshape(-1, B, Q).numpy()
    n = num_targets.cpu().numpy()
    ours, ref, scale = [], [], []
    for p in range(c.shape[0]):
        for b in range(B):
            k = int(n[b])
            q = np.nonzero(a[p, b] >= 0)[0]
            t = a[p, b, q]
            assert np.all(a[p, b] >= -1), f"problem {(p, b)}: invalid entries {a[p, b]}"
            assert sorted(t.tolist()) == list(range(k)), f"problem {(p, b)}: targets {sorted(t.tolist())}, n={k}"
            rows, cols = linear_sum_assignment(c[p, b, :, :k]) if k else (np.zeros(0, int), np.zeros(0, int))
            ours.append(c[p, b, q, t].sum())
            ref.append(c[p, b, rows, cols].sum())
            scale.append(np.abs(c[p, b, rows, cols]).sum())
    return np.array(ours), np.array(ref), np.array(scale)


def _make(shape, family, lead=()):
    def make(device, dtype, gen):
        B, Q, T = shape
        n = torch.randint(0, T + 1, (B,), generator=gen)
        n[0] = T  # at least one full problem
        cost = make_costs(family, (*lead, B, Q, T), n, gen, dtype)
        return (cost.to(device), n.to(device)), {}
    return make


def _check(out, args, kwargs, dtype):
    cost, n = args
    try:
        ours, ref, scale = totals(cost, n, out)
    except AssertionError:
        return float("inf"), REL_TOL
    err = np.abs(ours - ref) / np.maximum(scale, np.finfo(np.float64).tiny)
    return float(err.max(initial=0.0)), REL_TOL


for _family in FAMILIES:
    for _shape in ((16, 1, 1), (32, 7, 5), (16, 100, 30), (8, 100, 100), (2, 300, 120)):
        register(Case("linear_assignment", f"{_family} B={_shape[0]} Q={_shape[1]} T={_shape[2]}",
                      _make(_shape, _family), _check, dtypes=(torch.float32, torch.float64)))
register(Case("linear_assignment", "detr L=6 B=8 Q=100 T=30", _make((8, 100, 30), "detr", (6,)), _check))


def _bench_make(L, B, Q, T):
    def make(device, dtype, gen):
        n = torch.full((B,), T, dtype=torch.int64)
        cost = make_costs("detr", ((L,) if L > 1 else ()) + (B, Q, T), n, gen, dtype)
        return (cost.to(device), n.to(device)), {}
    return make


for _B in (8, 64):
    for _Q in (100, 300):
        for _T in (7, 30, 100):
            register(Case("linear_assignment", f"bench B={_B} Q={_Q} T={_T}", _bench_make(1, _B, _Q, _T), _check,
                          tags=("bench",)))
    for _T in (7, 30):
        register(Case("linear_assignment", f"bench L=6 B={_B} Q=100 T={_T}", _bench_make(6, _B, 100, _T), _check,
                      tags=("bench",)))
