"""Timing helpers and the kernel microbenchmark runner (`detr-fast bench`, benchmarks/bench_ops.py).

Each registry case tagged "bench" is timed three ways on the same inputs: the reference, torch.compile of the
reference, and our op; forward, and forward+backward when the case names differentiable args. Medians only;
nothing here asserts a time.
"""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device: str, warmup: int = 3, iters: int = 20,
              min_time_s: float = 0.0) -> float:
    """Median wall time of fn() in milliseconds, measured with CUDA events on a GPU and perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    t_start = time.perf_counter()
    while len(times) < iters or time.perf_counter() - t_start < min_time_s:
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 10 * iters:
            break
    return statistics.median(times)


def environment(device: str) -> str:
    """One line: device name, torch / CUDA / Python versions."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return (f"device: {name} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
            f"Python {platform.python_version()}")


def format_table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) if rows else len(c) for c in columns}
    lines = [" | ".join(c.ljust(widths[c]) for c in columns), "-|-".join("-" * widths[c] for c in columns)]
    lines += [" | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _outputs(out) -> list[torch.Tensor]:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point() and o.requires_grad]


def _runner(fn, args, kwargs, grad_args, backward: bool):
    if not backward:
        return lambda: fn(*args, **kwargs)
    leaves = [args[i] for i in grad_args]

    def step():
        for t in leaves:
            t.grad = None
        out = fn(*args, **kwargs)
        loss = sum(o.float().sum() for o in _outputs(out))
        loss.backward()
    return step


def run_op_benchmarks(device: str, ops: list[str] | None = None, compile_ref: bool = True,
                      iters: int = 20, compile_filter: str = "") -> list[dict]:
    """Time every "bench" case of the registry on `device`; returns one row per (case, dtype, pass).

    compile_filter: a regular expression over "<op> <case>"; torch.compile(reference) is timed only for the cases
    it matches (empty: all). Compiling takes seconds per shape, so a GPU check names the cases that matter."""
    import re

    import detr_fast.ops as ops_mod
    from detr_fast.ops import reference
    from detr_fast.ops.registry import cases

    rows = []
    for case in cases(device=device, tag="bench"):
        if ops and case.op not in ops:
            continue
        ours_fn = getattr(ops_mod, case.op)
        ref_fn = getattr(reference, case.op)
        compiled = None
        if compile_ref and (not compile_filter or re.search(compile_filter, f"{case.op} {case.name}")):
            try:
                compiled = torch.compile(ref_fn, dynamic=False)
            except Exception:  # torch.compile unavailable on this platform
                compiled = None
        for dtype in case.dtypes:
            for backward in ((False, True) if case.grad_args else (False,)):
                gen = torch.Generator().manual_seed(0)
                args, kwargs = case.make(torch.device(device), dtype, gen)
                if backward:
                    args = tuple(a.detach().requires_grad_(True) if i in case.grad_args else a
                                 for i, a in enumerate(args))
                row = {"op": case.op, "case": case.name, "dtype": str(dtype).replace("torch.", ""),
                       "pass": "fwd+bwd" if backward else "fwd"}
                row["reference_ms"] = median_ms(_runner(ref_fn, args, kwargs, case.grad_args, backward), device,
                                                iters=iters)
                if compiled is not None:
                    try:
                        row["compiled_ref_ms"] = median_ms(
                            _runner(compiled, args, kwargs, case.grad_args, backward), device, iters=iters)
                    except Exception as exc:  # e.g. scipy inside the reference cannot be compiled
                        row["compiled_ref_ms"] = None
                        row["note"] = f"compile failed: {type(exc).__name__}"
                row["ours_ms"] = median_ms(_runner(ours_fn, args, kwargs, case.grad_args, backward), device,
                                           iters=iters)
                row["speedup"] = row["reference_ms"] / row["ours_ms"] if row["ours_ms"] > 0 else None
                if row.get("compiled_ref_ms"):
                    row["vs_compiled"] = row["compiled_ref_ms"] / row["ours_ms"]
                rows.append(row)
    return rows


BENCH_COLUMNS = ["op", "case", "dtype", "pass", "reference_ms", "compiled_ref_ms", "ours_ms", "speedup",
                 "vs_compiled", "note"]
