"""Kernel microbenchmarks: reference vs torch.compile(reference) vs ours, for every "bench" case of the registry.

    python benchmarks/bench_ops.py [--device cuda] [--ops box_loss,matching_cost] [--no-compile] [--json out.json]
"""
import argparse
import json
import sys

import torch

from detr_fast.bench import BENCH_COLUMNS, environment, format_table, run_op_benchmarks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    ap.add_argument("--compile-filter", default="",
                    help="regex over '<op> <case>': compile the reference only for matching cases")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    a = ap.parse_args(argv)
    ops = [o for o in a.ops.split(",") if o] or None
    print(environment(a.device), flush=True)
    rows = run_op_benchmarks(a.device, ops, compile_ref=not a.no_compile, iters=a.iters,
                             compile_filter=a.compile_filter)
    print(format_table(rows, BENCH_COLUMNS))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"environment": environment(a.device), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
