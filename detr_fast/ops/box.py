"""matching_cost and box_loss: fused box kernels (csrc/box_ops), registered with torch.library.

Both ops run the CUDA kernel for CUDA tensors, the C++ kernel for CPU tensors, and the reference
(detr_fast.ops.reference) where that kernel is not built. The box math (GIoU with eps = reference.GIOU_EPS, its
analytic gradient) is written once in csrc/common/box_math.h for both kernels.

Precision: fp16, bf16 and fp32 inputs are computed in fp32 and give fp32 outputs; fp64 inputs are computed and
returned in fp64. So under autocast the ops take the low-precision tensors as they come (no cast kernel is
launched) and return fp32; the gradient w.r.t. a box tensor has that tensor's dtype.

Invalid target values: the CPU op raises ValueError for num_targets outside [0, T] or a real target's label outside
[0, C). The CUDA op never reads device values on the host (that would sync), so it writes NaN in those columns
(every column of an image whose num_targets is out of range); linear_assignment rejects NaN costs with an error.
"""
from __future__ import annotations

import functools

import torch

from detr_fast.ops import reference
from detr_fast.ops._ext import extension_loaded, has_kernel


@functools.lru_cache(maxsize=None)
def _has_kernel(op: str, device_type: str) -> bool:
    return has_kernel(op, device_type)


@torch.compiler.assume_constant_result
def _kernel_for(op: str, device_type: str) -> bool:
    """has_kernel, cached, and seen by torch.compile as a constant (it asks the dispatcher, which dynamo cannot
    trace)."""
    return _has_kernel(op, device_type)


def matching_cost(logits, pred_boxes, labels, boxes, num_targets, w_class=1.0, w_bbox=5.0, w_giou=2.0):
    """DETR's matching cost of every (query, target) pair of every image (and decoder layer), in one launch.

    logits [*, B, Q, C], pred_boxes [*, B, Q, 4] cxcywh (any leading dims, e.g. L decoder layers); labels [B, T]
    int64, boxes [B, T, 4] cxcywh, num_targets [B] int64 -> cost [*, B, Q, T] float32 (float64 for float64 logits):
    w_bbox * L1 - w_class * softmax(logits)[label] - w_giou * GIoU; columns t >= num_targets[b] hold +inf.
    Not differentiable: the result never requires grad (the matcher runs under no_grad).
    """
    if _kernel_for("matching_cost", logits.device.type):
        return torch.ops.detr_fast.matching_cost(logits.detach(), pred_boxes.detach(), labels, boxes.detach(),
                                                 num_targets, float(w_class), float(w_bbox), float(w_giou))
    with torch.no_grad():
        return reference.matching_cost(logits, pred_boxes, labels, boxes, num_targets, w_class, w_bbox, w_giou)


def box_loss(pred, target):
    """Per-pair box losses of matched boxes: pred [N, 4], target [N, 4] cxcywh -> (l1 [N], giou_loss [N]).

    l1 = sum over the 4 coordinates of |pred - target|, giou_loss = 1 - GIoU(pred, target). Differentiable w.r.t.
    pred (and target, should it require grad), with the analytic gradient of the fused backward kernel.
    """
    if _kernel_for("box_loss", pred.device.type):
        l1, giou_loss = torch.ops.detr_fast.box_loss(pred, target)
        return l1, giou_loss
    # the fallback keeps the op's contract: fp16/bf16 inputs are computed and returned in fp32
    dtype = _loss_dtype(pred, target)
    return reference.box_loss(pred.to(dtype), target.to(dtype))


def _loss_dtype(pred, target):
    return torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32


def _register() -> None:
    @torch.library.register_fake("detr_fast::matching_cost")
    def _matching_cost_fake(logits, pred_boxes, labels, boxes, num_targets, w_class, w_bbox, w_giou):
        if logits.dim() < 3 or pred_boxes.shape != (*logits.shape[:-1], 4) or labels.dim() != 2:
            raise ValueError(f"matching_cost: logits [*, B, Q, C], pred_boxes [*, B, Q, 4], labels [B, T] expected, "
                             f"got {tuple(logits.shape)}, {tuple(pred_boxes.shape)}, {tuple(labels.shape)}")
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return logits.new_empty((*logits.shape[:-1], labels.shape[1]), dtype=dtype)  # [*, B, Q, T]

    @torch.library.register_fake("detr_fast::box_loss")
    def _box_loss_fake(pred, target):
        if pred.dim() != 2 or pred.shape[-1] != 4 or pred.shape != target.shape:
            raise ValueError(f"box_loss: pred and target must both be [N, 4], got {tuple(pred.shape)} and "
                             f"{tuple(target.shape)}")
        dtype = _loss_dtype(pred, target)
        return pred.new_empty(pred.shape[:1], dtype=dtype), pred.new_empty(pred.shape[:1], dtype=dtype)  # [N], [N]

    @torch.library.register_fake("detr_fast::box_loss_backward")
    def _box_loss_backward_fake(grad_l1, grad_giou, pred, target):
        return pred.new_empty(pred.shape)  # [N, 4], contiguous, pred's dtype

    def setup_context(ctx, inputs, output):
        pred, target = inputs
        ctx.save_for_backward(pred, target)

    def backward(ctx, grad_l1, grad_giou):
        pred, target = ctx.saved_tensors
        dtype = _loss_dtype(pred, target)
        if grad_l1 is None:
            grad_l1 = pred.new_zeros(pred.shape[:1], dtype=dtype)
        if grad_giou is None:
            grad_giou = pred.new_zeros(pred.shape[:1], dtype=dtype)
        grad_pred = grad_target = None
        if ctx.needs_input_grad[0]:
            grad_pred = torch.ops.detr_fast.box_loss_backward(grad_l1, grad_giou, pred, target)  # [N, 4]
        if ctx.needs_input_grad[1]:
            # Both losses are symmetric in (pred, target), bit for bit, so the same kernel with the roles swapped
            # gives the gradient w.r.t. target (DETR's targets never require grad; this keeps the op honest).
            grad_target = torch.ops.detr_fast.box_loss_backward(grad_l1, grad_giou, target, pred)  # [N, 4]
        return grad_pred, grad_target

    torch.library.register_autograd("detr_fast::box_loss", backward, setup_context=setup_context)


if extension_loaded():
    _register()
