"""Work counters of linear_assignment on the CPU (DETR_FAST_LA_STATS=1), one subprocess per (family, shape, engine).

    python benchmarks/assignment_work_counts.py [FAMILIES] [BxQxTxL,...] [ENGINES]

e.g. `detr,uniform 64x100x30x1 ssp,auction`. Prints totals and per-problem counts (rounds, steps, scans, barriers);
no times. The counters are defined in csrc/common/auction.h (struct Stats).
"""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = r'''
import sys, torch
torch.set_num_threads(1)
import detr_fast.ops as ops
from detr_fast.ops.cases_assignment import make_costs
fam, B, Q, T, L = sys.argv[1], *map(int, sys.argv[2:6])
gen = torch.Generator().manual_seed(1)
n = torch.full((B,), T, dtype=torch.int64)
ops.linear_assignment(make_costs(fam, ((L,) if L > 1 else ()) + (B, Q, T), n, gen), n)
'''
NAMES = ("auction", "rounds", "released", "steps", "cold", "scans", "barriers")
SHAPES = "64x100x7x1,64x100x30x1,64x100x100x1,64x300x7x1,64x300x30x1,64x300x100x1,16x300x300x1"


def main():
    fams = (sys.argv[1] if len(sys.argv) > 1 else "detr").split(",")
    shapes = [tuple(map(int, s.split("x"))) for s in (sys.argv[2] if len(sys.argv) > 2 else SHAPES).split(",")]
    engines = (sys.argv[3] if len(sys.argv) > 3 else "ssp,auction").split(",")
    print(f"{'family':8} {'B':>3} {'Q':>4} {'T':>4} {'engine':8} {'rounds':>7} {'released':>8} {'steps':>7} "
          f"{'cold':>4} {'scans':>8} {'barriers':>9}  (per problem: rounds, steps, scans, barriers)")
    for fam in fams:
        for B, Q, T, L in shapes:
            for eng in engines:
                env = dict(os.environ, DETR_FAST_LA_STATS="1", DETR_FAST_LA_ENGINE=eng, PYTHONPATH=ROOT)
                args = [sys.executable, "-c", CODE, fam, str(B), str(Q), str(T), str(L)]
                r = subprocess.run(args, env=env, capture_output=True, text=True)
                line = [ln for ln in r.stderr.splitlines() if ln.startswith("linear_assignment_cpu")]
                if not line:
                    print(r.stderr[-2000:])
                    continue
                d = {k: int(v) for k, v in re.findall(r"(" + "|".join(NAMES) + r") (\d+)", line[0])}
                P = int(re.search(r"(\d+) problems", line[0]).group(1))
                print(f"{fam:8} {B:3} {Q:4} {T:4} {eng:8} {d['rounds']:7} {d['released']:8} {d['steps']:7} "
                      f"{d['cold']:4} {d['scans']:8} {d['barriers']:9}  ({d['rounds'] / P:.1f}, {d['steps'] / P:.1f}, "
                      f"{d['scans'] / P:.1f}, {d['barriers'] / P:.1f})", flush=True)


if __name__ == "__main__":
    main()
