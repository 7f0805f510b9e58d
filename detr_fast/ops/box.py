"""matching_cost and box_loss (kernels in csrc/box_ops)."""
from __future__ import annotations

import torch

from detr_fast.ops import reference
from detr_fast.ops._ext import has_kernel


def matching_cost(logits, pred_boxes, labels, boxes, num_targets, w_class=1.0, w_bbox=5.0, w_giou=2.0):
    """See reference.matching_cost: [*, B, Q, C], [*, B, Q, 4], targets -> cost [*, B, Q, T]."""
    if has_kernel("matching_cost", logits.device.type):
        return torch.ops.detr_fast.matching_cost(logits, pred_boxes, labels, boxes, num_targets,
                                                 float(w_class), float(w_bbox), float(w_giou))
    return reference.matching_cost(logits, pred_boxes, labels, boxes, num_targets, w_class, w_bbox, w_giou)


def box_loss(pred, target):
    """See reference.box_loss: pred [N, 4], target [N, 4] -> (l1 [N], giou_loss [N])."""
    return reference.box_loss(pred, target)
