"""One registry of validation cases per op, shared by the tests, `detr-fast validate` and benchmarks/.

Each op contributes its cases from a module detr_fast/ops/cases_<op>.py that calls `register(Case(...))`.
A case draws fresh random inputs from a seed, runs the op through detr_fast.ops and compares with the reference
by its own rule (e.g. fp32 tolerance, or twice the error of the reference computed in the same low precision).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Case:
    op: str  # name in detr_fast.ops
    name: str  # short label, e.g. "B=8 Q=100 T=7"
    # make(device, dtype, generator) -> (args, kwargs); inputs drawn with the CPU generator then moved to device
    make: Callable[[torch.device, torch.dtype, torch.Generator], tuple[tuple, dict]]
    # check(output, args, kwargs, dtype) -> (error, tolerance); passes when error <= tolerance
    check: Callable[[Any, tuple, dict, torch.dtype], tuple[float, float]]
    dtypes: tuple = (torch.float32,)
    devices: tuple = ("cpu", "cuda")
    tags: tuple = field(default_factory=tuple)  # e.g. ("bench",) for benchmark shapes
    grad_args: tuple = ()  # positions of args that are differentiable (benchmarks time forward+backward)


@dataclass
class Result:
    op: str
    case: str
    device: str
    dtype: str
    error: float
    tolerance: float
    passed: bool
    message: str = ""


_CASES: list[Case] = []
_loaded = False


def register(case: Case) -> Case:
    _CASES.append(case)
    return case


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import detr_fast.ops as pkg

    for mod in sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("cases_")):
        importlib.import_module(f"detr_fast.ops.{mod}")


def cases(op: str | None = None, device: str | None = None, tag: str | None = None) -> list[Case]:
    _load()
    return [c for c in _CASES if (op is None or c.op == op) and (device is None or device in c.devices)
            and (tag is None or tag in c.tags)]


def run_case(case: Case, device: str, dtype: torch.dtype, seed: int) -> Result:
    """Draw the case's inputs from `seed`, run the op on `device` and compare with the reference."""
    import detr_fast.ops as ops

    gen = torch.Generator().manual_seed(seed)
    args, kwargs = case.make(torch.device(device), dtype, gen)
    try:
        out = getattr(ops, case.op)(*args, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        err, tol = case.check(out, args, kwargs, dtype)
        passed = bool(err <= tol)  # NaN error fails
        msg = ""
    except Exception as exc:  # reported as a failure, not raised: validate prints every row
        err, tol, passed, msg = float("nan"), float("nan"), False, f"{type(exc).__name__}: {exc}"
    return Result(case.op, case.name, device, str(dtype).replace("torch.", ""), float(err), float(tol), passed, msg)


def run_all(device: str, ops: list[str] | None = None, seed: int = 0) -> list[Result]:
    results = []
    for i, case in enumerate(cases(device=device)):
        if ops and case.op not in ops:
            continue
        for dtype in case.dtypes:
            if device == "cpu" and dtype in (torch.float16,) and "cpu_half" not in case.tags:
                continue
            results.append(run_case(case, device, dtype, seed + 1000 * i))
    return results
