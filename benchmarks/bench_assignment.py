"""linear_assignment timings: the reference matcher (copy to host + scipy per image), scipy alone on host costs,
and ours, on DETR-like costs for B = 8 / 64, Q = 100 / 300, T = 7 / 30 / 100 and L = 6 stacked decoder layers.

    python benchmarks/bench_assignment.py [--device cuda] [--iters 20] [--quick] [--engines auto,auction,ssp]

--engines times ours once per solver engine (DETR_FAST_LA_ENGINE, see csrc/common/auction.h): the default auto, the
auction warm start on every problem, cold shortest augmenting paths on every problem.

Prints the device and versions, then a table of medians in milliseconds. Never asserts a time.
"""
import argparse
import os
import sys

import torch
from scipy.optimize import linear_sum_assignment

import detr_fast.ops as ops
from detr_fast.bench import environment, format_table, median_ms
from detr_fast.ops import reference
from detr_fast.ops.cases_assignment import make_costs


def scipy_only(cost_np, n):
    """scipy per problem on costs already on the host (what the reference spends beyond the copy)."""
    for p in range(cost_np.shape[0]):
        for b in range(cost_np.shape[1]):
            k = int(n[b])
            if k:
                linear_sum_assignment(cost_np[p, b, :, :k])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="only B=64 Q=100 T=7/30, single and L=6")
    ap.add_argument("--engines", default="auto", help="comma-separated DETR_FAST_LA_ENGINE values to time")
    a = ap.parse_args(argv)
    print(environment(a.device), flush=True)
    shapes = [(1, 64, 100, 7), (1, 64, 100, 30), (6, 64, 100, 7), (6, 64, 100, 30)]
    if not a.quick:
        shapes = [(L, B, Q, T) for L in (1, 6) for B in (8, 64) for Q in (100, 300) for T in (7, 30, 100)
                  if L == 1 or Q == 100]
    rows = []
    for L, B, Q, T in shapes:
        gen = torch.Generator().manual_seed(0)
        n = torch.full((B,), T, dtype=torch.int64)
        cost = make_costs("detr", ((L,) if L > 1 else ()) + (B, Q, T), n, gen)
        cost_d, n_d = cost.to(a.device), n.to(a.device)
        host = cost.double().reshape(-1, B, Q, T).numpy()
        few = max(3, a.iters // 4)
        row = {"L": L, "B": B, "Q": Q, "T": T}
        row["reference_ms"] = median_ms(lambda: reference.linear_assignment(cost_d, n_d), a.device, iters=few)
        row["scipy_only_ms"] = median_ms(lambda: scipy_only(host, n.numpy()), "cpu", iters=few)
        engines = a.engines.split(",")
        for eng in engines:  # the engine is read from the environment on every call
            os.environ["DETR_FAST_LA_ENGINE"] = eng
            key = "ours_ms" if eng == "auto" else f"ours_{eng}_ms"
            row[key] = median_ms(lambda: ops.linear_assignment(cost_d, n_d), a.device, iters=a.iters)
        os.environ["DETR_FAST_LA_ENGINE"] = engines[0]
        first = "ours_ms" if engines[0] == "auto" else f"ours_{engines[0]}_ms"
        row["speedup"] = row["reference_ms"] / row[first]
        ours = ops.linear_assignment(cost_d, n_d).cpu()
        ref = reference.linear_assignment(cost, n)
        pick = lambda a_: torch.where(a_ >= 0, cost.double().gather(-1, a_.clamp(min=0)[..., None])[..., 0], 0)
        row["max_total_diff"] = float((pick(ours).sum(-1) - pick(ref).sum(-1)).abs().max())
        rows.append(row)
        print(format_table([row], list(row)), flush=True)
    print()
    print(format_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
