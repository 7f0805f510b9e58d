"""linear_assignment: exact batched assignment of targets to queries (kernels in csrc/assignment).

The algorithm (an auction warm start, then shortest augmenting paths with a duality certificate) and its
exactness argument are in csrc/common/auction.h. DETR_FAST_LA_ENGINE=auto|auction|ssp picks the warm start (auto:
the auction for 4 <= num_targets <= Q / 2, cold shortest augmenting paths otherwise; every choice is exact). The CUDA
kernel solves every problem of the batch in one launch and never synchronizes with the host; the CPU kernel runs the
same solver, one problem per thread.

Invalid input:
- static problems (wrong dtype or shape, T > Q, device mismatch) raise ValueError on every device;
- NaN or infinite costs among the real targets, or num_targets outside [0, T], raise ValueError at once on the CPU.
  On CUDA the kernel cannot raise without a sync: it writes -2 into every query slot of such a problem, and
  `check_assignment(assignment)` raises the ValueError (one host sync: call it at log intervals, or set
  DETR_FAST_SYNC_CHECKS=1 to check after every CUDA call).
"""
from __future__ import annotations

import os

import torch

from detr_fast.ops import reference
from detr_fast.ops._ext import extension_loaded, has_kernel

INVALID = -2  # value of every query slot of a problem with invalid input (CUDA)

_SYNC_CHECKS = os.environ.get("DETR_FAST_SYNC_CHECKS", "0") == "1"

if extension_loaded():
    @torch.library.register_fake("detr_fast::linear_assignment")
    def _linear_assignment_fake(cost, num_targets):
        torch._check(cost.dim() >= 3, lambda: f"cost must be [*, B, Q, T], got {tuple(cost.shape)}")
        return cost.new_empty(cost.shape[:-1], dtype=torch.int64)


def linear_assignment(cost, num_targets):
    """Optimal assignment of the num_targets[b] real targets of each problem to distinct queries.

    cost [*, B, Q, T] float32 or float64 (other floating types are widened to float32), any leading dims (e.g. the
    L decoder layers, num_targets is shared across them); num_targets [B] int64 on cost's device; T <= Q.
    Returns assignment [*, B, Q] int64: the target index matched to each query, -1 for none. Columns
    t >= num_targets[b] are padding (any value, +inf by convention) and are never used. The total cost equals
    scipy.optimize.linear_sum_assignment's on every problem. See the module docstring for invalid input.
    """
    if has_kernel("linear_assignment", cost.device.type):
        out = torch.ops.detr_fast.linear_assignment(cost, num_targets)
        # not while a CUDA graph is captured: the check reads a flag on the host, which a capture forbids
        if _SYNC_CHECKS and out.is_cuda and not torch.cuda.is_current_stream_capturing():
            check_assignment(out)
        return out
    return reference.linear_assignment(cost, num_targets)


def check_assignment(assignment: torch.Tensor) -> torch.Tensor:
    """Raise ValueError if a CUDA result marks invalid input (NaN/inf costs, num_targets outside [0, T]).

    assignment [*, B, Q] int64 from linear_assignment. Synchronizes with the device (reads one flag). Returns
    the assignment unchanged, so calls can be chained.
    """
    bad = (assignment == INVALID).any(dim=-1)  # [*, B]
    if bool(bad.any()):  # host sync, by design: the one place where invalid CUDA input becomes an exception
        where = bad.nonzero()[0].tolist()  # sync: only after the flag was found, to name the bad problem
        raise ValueError(f"linear_assignment: problem at index {where} of the [*, B] batch had NaN or infinite costs "
                         "among its real targets, or num_targets outside [0, T]")
    return assignment
