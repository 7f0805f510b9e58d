"""linear_assignment (kernels in csrc/assignment)."""
from __future__ import annotations

import torch

from detr_fast.ops import reference
from detr_fast.ops._ext import has_kernel


def linear_assignment(cost, num_targets):
    """See reference.linear_assignment: cost [*, B, Q, T], num_targets [B] -> assignment [*, B, Q] int64."""
    if has_kernel("linear_assignment", cost.device.type):
        return torch.ops.detr_fast.linear_assignment(cost, num_targets)
    return reference.linear_assignment(cost, num_targets)
