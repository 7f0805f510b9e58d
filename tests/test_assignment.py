"""linear_assignment against scipy.optimize.linear_sum_assignment, on >= 10,000 fresh problems per run per device.

Each run draws new problems (seed from the clock, printed on failure) over sizes Q = 1..300, T = 0..Q and the cost
families of detr_fast.ops.cases_assignment; every result must be a valid one-to-one matching of the real targets,
with total cost equal to scipy's within 1e-6 of the sum of |matched costs|, and equal indices wherever the
second-best assignment (computed on small problems) is worse by more than 1e-5 relative.
"""
import time

import numpy as np
import pytest
import torch
from helpers import cpu_and_cuda
from scipy.optimize import linear_sum_assignment

import detr_fast.ops as ops
from detr_fast.ops import reference
from detr_fast.ops.assignment import check_assignment
from detr_fast.ops.cases_assignment import FAMILIES, REL_TOL, make_costs, totals
from detr_fast.ops.registry import cases, run_case

pytestmark = pytest.mark.skipif(not ops.has_kernel("linear_assignment", "cpu"), reason="extension not built")

# (Q, T, problems per family): many small problems, fewer large ones. 5 families x 2,075 = 10,375 problems.
SIZES = [(1, 1, 150), (2, 2, 150), (3, 3, 200), (4, 2, 200), (5, 5, 200), (7, 4, 200), (8, 8, 200), (13, 9, 200),
         (21, 21, 150), (34, 20, 150), (55, 55, 60), (100, 30, 80), (100, 100, 20), (150, 7, 80), (213, 97, 20),
         (300, 30, 10), (300, 300, 5)]


def _seed():
    return int(time.time_ns() % (2**31))


def _second_best_gap(c: np.ndarray, rows, cols) -> float:
    """Cost of the best assignment that differs from (rows, cols) minus the optimum (small problems only)."""
    best = c[rows, cols].sum()
    gap = np.inf
    for r, k in zip(rows, cols):
        d = c.copy()
        d[r, k] = 1e30  # forbid one matched pair: every other assignment avoids at least one of them
        rr, cc = linear_sum_assignment(d)
        gap = min(gap, d[rr, cc].sum() - best)
    return gap


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_random_problems_match_scipy(device):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    count = 0
    index_checked = 0
    for family in FAMILIES:
        for Q, T, num in SIZES:
            n = torch.randint(0, T + 1, (num,), generator=gen)
            n[0] = T
            cost = make_costs(family, (num, Q, T), n, gen)
            out = ops.linear_assignment(cost.to(device), n.to(device))
            assert out.shape == (num, Q) and out.dtype == torch.int64 and out.device.type == device
            ours, ref, scale = totals(cost, n, out)
            err = np.abs(ours - ref) - REL_TOL * scale
            assert (err <= 0).all(), (f"seed {seed} {family} Q={Q} T={T}: worst problem {err.argmax()} "
                                      f"ours {ours[err.argmax()]} scipy {ref[err.argmax()]}")
            count += num
            if Q <= 8:  # same indices as scipy where the optimum is unique by a margin
                c = cost.double().numpy()
                a = out.cpu().numpy()
                for b in range(num):
                    k = int(n[b])
                    if k == 0:
                        continue
                    rows, cols = linear_sum_assignment(c[b, :, :k])
                    if _second_best_gap(c[b, :, :k], rows, cols) > 1e-5 * max(np.abs(c[b, rows, cols]).sum(), 1e-30):
                        expect = np.full(Q, -1)
                        expect[rows] = cols
                        assert (a[b] == expect).all(), f"seed {seed} {family} Q={Q}: {a[b]} vs scipy {expect}"
                        index_checked += 1
    assert count >= 10_000
    assert index_checked >= 1000


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stacked_layers_equal_per_layer(device, dtype):
    gen = torch.Generator().manual_seed(_seed())
    L, B, Q, T = 6, 5, 40, 13
    n = torch.tensor([13, 0, 7, 1, 12])
    cost = make_costs("detr", (L, B, Q, T), n, gen, dtype).to(device)
    out = ops.linear_assignment(cost, n.to(device))
    assert out.shape == (L, B, Q)
    for layer in range(L):
        assert torch.equal(out[layer], ops.linear_assignment(cost[layer], n.to(device)))
    ours, ref, scale = totals(cost, n, out)
    assert (np.abs(ours - ref) <= REL_TOL * scale).all()
    # Two leading dims are flattened the same way.
    out2 = ops.linear_assignment(cost.reshape(2, 3, B, Q, T), n.to(device))
    assert torch.equal(out2.reshape(L, B, Q), out)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_padding_never_used_and_zero_targets(device):
    gen = torch.Generator().manual_seed(_seed())
    B, Q, T = 6, 20, 12
    n = torch.tensor([0, 3, 12, 0, 5, 1])
    cost = make_costs("uniform", (B, Q, T), n, gen)
    # Padding that would be attractive (very negative), NaN or +inf must not matter.
    pad = ~(torch.arange(T)[None, :] < n[:, None])[:, None, :].expand(B, Q, T)
    for fill in (-1e9, float("nan"), float("inf"), float("-inf")):
        c = cost.masked_fill(pad, fill)
        out = check_assignment(ops.linear_assignment(c.to(device), n.to(device))).cpu()
        for b in range(B):
            assert ((out[b] < n[b]) | (out[b] == -1)).all()
            assert (out[b] >= 0).sum() == n[b]
        assert (out[0] == -1).all() and (out[3] == -1).all()
    # T = 0 and B = 0 give empty or all -1 results.
    assert (ops.linear_assignment(torch.zeros(3, 4, 0, device=device), torch.zeros(3, dtype=torch.int64,
                                                                                   device=device)) == -1).all()
    assert ops.linear_assignment(torch.zeros(0, 4, 2, device=device),
                                 torch.zeros(0, dtype=torch.int64, device=device)).shape == (0, 4)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_dtypes_and_noncontiguous(device):
    gen = torch.Generator().manual_seed(_seed())
    B, Q, T = 4, 30, 10
    n = torch.tensor([10, 4, 0, 9])
    cost = make_costs("detr", (B, Q, T), n, gen, torch.float64)
    nd = n.to(device)
    base = ops.linear_assignment(cost.to(device), nd)
    # Transposed storage: a [B, T, Q] tensor viewed as [B, Q, T].
    nc = cost.transpose(1, 2).contiguous().transpose(1, 2).to(device)
    assert not nc.is_contiguous()
    assert torch.equal(ops.linear_assignment(nc, nd), base)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        c = cost.to(dtype)
        out = ops.linear_assignment(c.to(device), nd)
        ours, ref, scale = totals(c.float(), n, out)  # optimal for the costs as the op read them (widened)
        assert (np.abs(ours - ref) <= REL_TOL * scale).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_invalid_costs_raise(device):
    gen = torch.Generator().manual_seed(_seed())
    B, Q, T = 3, 50, 20
    n = torch.tensor([20, 5, 0])
    for bad in (float("nan"), float("-inf"), float("inf")):
        cost = make_costs("uniform", (B, Q, T), n, gen)
        cost[1, 7, 3] = bad  # a real target of problem 1
        with pytest.raises(ValueError, match="NaN or infinite"):  # found in the solver's first pass: no hang
            check_assignment(ops.linear_assignment(cost.to(device), n.to(device)))
        with pytest.raises(ValueError):
            reference.linear_assignment(cost, n)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_bad_arguments_raise(device):
    cost = torch.rand(2, 5, 6, device=device)
    with pytest.raises(ValueError, match="T=6 > Q=5"):
        ops.linear_assignment(cost, torch.tensor([1, 1], device=device))
    cost = torch.rand(2, 6, 5, device=device)
    with pytest.raises(ValueError, match="int64"):
        ops.linear_assignment(cost, torch.tensor([1, 1], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="num_targets must be"):
        ops.linear_assignment(cost, torch.tensor([1, 1, 1], device=device))
    with pytest.raises(ValueError, match="floating"):
        ops.linear_assignment(cost.long(), torch.tensor([1, 1], device=device))
    with pytest.raises(ValueError, match="cost must be"):
        ops.linear_assignment(cost[0, 0], torch.tensor([1], device=device))
    with pytest.raises(ValueError):  # num_targets above T (on CUDA: reported by check_assignment)
        check_assignment(ops.linear_assignment(cost, torch.tensor([6, 1], device=device)))
    with pytest.raises(ValueError):
        check_assignment(ops.linear_assignment(cost, torch.tensor([-1, 1], device=device)))


@pytest.mark.needs_cuda
def test_device_mismatch_raises():
    with pytest.raises(ValueError, match="same device"):
        ops.linear_assignment(torch.rand(2, 6, 5, device="cuda"), torch.tensor([1, 1]))


@pytest.mark.needs_cuda
def test_cuda_equals_cpu():
    gen = torch.Generator().manual_seed(_seed())
    n = torch.randint(0, 31, (64,))
    for family in FAMILIES:
        cost = make_costs(family, (6, 64, 100, 30), n, gen)
        a = ops.linear_assignment(cost, n)
        b = ops.linear_assignment(cost.cuda(), n.cuda()).cpu()
        ca = torch.where(a >= 0, cost.double().gather(-1, a.clamp(min=0)[..., None])[..., 0], 0).sum(-1)
        cb = torch.where(b >= 0, cost.double().gather(-1, b.clamp(min=0)[..., None])[..., 0], 0).sum(-1)
        torch.testing.assert_close(ca, cb, rtol=1e-9, atol=0)


def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    n = torch.tensor([3, 0, 5])
    cost = make_costs("uniform", (2, 3, 9, 5), n, gen)
    torch.library.opcheck(torch.ops.detr_fast.linear_assignment.default, (cost, n),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_registry_cases(device):
    results = [run_case(c, device, dtype, seed=_seed() + i)
               for i, c in enumerate(cases("linear_assignment", device=device)) if "bench" not in c.tags
               for dtype in c.dtypes]
    failed = [r for r in results if not r.passed]
    assert results and not failed, failed


# Mostly rectangular sizes (n < Q), where the auction warm start and cold SSP differ most; a few near-square and
# square ones. 5 families x 1,415 = 7,075 problems per engine.
ENGINE_SIZES = [(2, 1, 200), (5, 3, 200), (8, 4, 200), (13, 6, 200), (21, 10, 150), (34, 12, 150), (60, 30, 60),
                (100, 7, 80), (100, 30, 80), (100, 50, 30), (100, 90, 10), (150, 7, 40), (300, 30, 10), (300, 100, 5)]


def _stats(text):
    """Work counters printed by the CPU kernel with DETR_FAST_LA_STATS=1: {name: total} of the last call."""
    line = [ln for ln in text.splitlines() if ln.startswith("linear_assignment_cpu:")][-1]
    words = line.split(":", 1)[1].replace(",", " ").split()
    return {name: int(words[k - 1]) if name == "problems" else int(words[k + 1])
            for k, name in enumerate(words) if not name.lstrip("-").isdigit()}


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("engine", ["auction", "ssp"])
def test_forced_engine_matches_scipy(device, engine, monkeypatch, capfd):
    """Each engine alone (the auction warm start on every problem, or cold SSP on every problem) is exact."""
    monkeypatch.setenv("DETR_FAST_LA_ENGINE", engine)
    monkeypatch.setenv("DETR_FAST_LA_STATS", "1")
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    count = 0
    for family in FAMILIES:
        for Q, T, num in ENGINE_SIZES:
            n = torch.randint(0, T + 1, (num,), generator=gen)
            n[0] = T
            cost = make_costs(family, (num, Q, T), n, gen)
            out = ops.linear_assignment(cost.to(device), n.to(device))
            ours, ref, scale = totals(cost, n, out)
            err = np.abs(ours - ref) - REL_TOL * scale
            assert (err <= 0).all(), (f"seed {seed} {engine} {family} Q={Q} T={T}: worst problem {err.argmax()} "
                                      f"ours {ours[err.argmax()]} scipy {ref[err.argmax()]}")
            count += num
            if device == "cpu":  # the forced engine really ran on every problem with targets
                st = _stats(capfd.readouterr().err)
                assert st["problems"] == num
                assert st["auction"] == (int((n > 0).sum()) if engine == "auction" else 0)
                if engine == "ssp":
                    assert st["rounds"] == 0 and st["cold"] == 0
    assert count >= 7000


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_uses_rectangular_auction_warm_start(family, monkeypatch, capfd):
    """At DETR's shapes the default engine runs the auction and keeps most of its matching (few rows left to the
    exact finish), with every certificate passing; the result is still scipy's optimum."""
    monkeypatch.delenv("DETR_FAST_LA_ENGINE", raising=False)
    monkeypatch.setenv("DETR_FAST_LA_STATS", "1")
    gen = torch.Generator().manual_seed(_seed())
    for Q, T in ((100, 7), (100, 30), (300, 30)):
        B = 32
        n = torch.full((B,), T, dtype=torch.int64)
        cost = make_costs(family, (B, Q, T), n, gen)
        out = ops.linear_assignment(cost, n)
        st = _stats(capfd.readouterr().err)
        assert st["auction"] == B and st["cold"] == 0
        assert st["released"] < B * T // 2, st  # the warm start kept more than half of the rows
        ours, ref, scale = totals(cost, n, out)
        assert (np.abs(ours - ref) <= REL_TOL * scale).all()
    # Square and near-square problems go to cold SSP by default.
    n = torch.full((4,), 40, dtype=torch.int64)
    ops.linear_assignment(make_costs(family, (4, 40, 40), n, gen), n)
    st = _stats(capfd.readouterr().err)
    assert st["auction"] == 0 and st["rounds"] == 0


def test_bad_engine_env_raises(monkeypatch):
    monkeypatch.setenv("DETR_FAST_LA_ENGINE", "greedy")
    with pytest.raises(ValueError, match="DETR_FAST_LA_ENGINE"):
        ops.linear_assignment(torch.rand(2, 6, 5), torch.tensor([5, 2]))
