"""Loading the compiled extension and asking which backends each op has."""
from __future__ import annotations

import functools
import warnings

import torch

OPS = ("matching_cost", "box_loss", "linear_assignment", "attention", "add_dropout_layernorm", "relu_dropout",
       "bias_act", "relu_backward_sum", "scale_many", "max_pool2d_nhwc", "space_to_depth")


@functools.lru_cache(maxsize=None)
def extension_loaded() -> bool:
    """True when detr_fast._C was built and imported (its import registers the detr_fast:: operators)."""
    try:
        import detr_fast._C  # noqa: F401
    except ImportError as exc:  # not built: every op falls back to the reference
        warnings.warn(f"detr_fast._C is not built ({exc}); ops run on the reference implementation", stacklevel=2)
        return False
    return True


def has_kernel(op: str, device_type: str) -> bool:
    """Whether detr_fast::<op> has a compiled kernel for a device type ('cpu' or 'cuda')."""
    if not extension_loaded():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"detr_fast::{op}", key)
    except RuntimeError:  # schema not registered
        return False


_warned: set = set()


def warn_fallback(op: str, reason: str) -> None:
    """Warn once per (op, reason) that `op` runs its reference implementation; called from the op's Python wrapper,
    so the warning points at the wrapper's caller."""
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"detr_fast.ops.{op}: {reason}; running reference.{op}", stacklevel=3)


def backends() -> dict[str, list[str]]:
    """{op: [backends]} where backends are among 'cpu', 'cuda' (compiled kernels) and 'reference' (always)."""
    return {op: [d for d in ("cpu", "cuda") if has_kernel(op, d)] + ["reference"] for op in OPS}
