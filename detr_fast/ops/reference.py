"""Reference implementations of every detr_fast op: plain PyTorch (and scipy for the assignment).

This module is the oracle: tests, `detr-fast validate` and the benchmarks compare the kernels with these functions,
and `model.kernels: reference` trains with them. Each function has the same signature as its op in detr_fast.ops.
They favour clarity over speed and may synchronize with the device (the assignment copies to the host).

Box conventions: boxes are (cx, cy, w, h), normalized to [0, 1] by the image size; GIoU uses GIOU_EPS below.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Added to the union and to the enclosing area before dividing, so that degenerate boxes (zero width or height,
# both boxes empty) give finite GIoU and gradients. The same constant is used by csrc/common/box_math.h.
GIOU_EPS = 1e-7


def box_cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1)."""
    cx, cy, w, h = b.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    """[..., 4] (x0, y0, x1, y1) -> [..., 4] (cx, cy, w, h)."""
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack(((x0 + x1) * 0.5, (y0 + y1) * 0.5, x1 - x0, y1 - y0), dim=-1)


def _giou_parts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU of xyxy boxes a [..., 4] and b [..., 4] that broadcast against each other."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = iw * ih
    union = area_a + area_b - inter
    iou = inter / (union + GIOU_EPS)
    cw = (torch.maximum(a[..., 2], b[..., 2]) - torch.minimum(a[..., 0], b[..., 0])).clamp(min=0)
    ch = (torch.maximum(a[..., 3], b[..., 3]) - torch.minimum(a[..., 1], b[..., 1])).clamp(min=0)
    area_c = cw * ch
    return iou - (area_c - union) / (area_c + GIOU_EPS)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU of cxcywh boxes: a [..., N, 4], b [..., M, 4] -> [..., N, M]."""
    return _giou_parts(box_cxcywh_to_xyxy(a)[..., :, None, :], box_cxcywh_to_xyxy(b)[..., None, :, :])


def elementwise_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU of matching cxcywh boxes: a [..., 4], b [..., 4] -> [...]."""
    return _giou_parts(box_cxcywh_to_xyxy(a), box_cxcywh_to_xyxy(b))


def _check_targets(labels: torch.Tensor, boxes: torch.Tensor, num_targets: torch.Tensor, batch: int) -> None:
    if labels.dim() != 2 or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 [B, T], got {labels.dtype} {tuple(labels.shape)}")
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[:2] != labels.shape:
        raise ValueError(f"boxes must be [B, T, 4] matching labels {tuple(labels.shape)}, got {tuple(boxes.shape)}")
    if num_targets.shape != (labels.shape[0],) or num_targets.dtype != torch.int64:
        raise ValueError(f"num_targets must be int64 [B], got {num_targets.dtype} {tuple(num_targets.shape)}")
    if labels.shape[0] != batch:
        raise ValueError(f"targets hold {labels.shape[0]} images but the predictions {batch}")
    if bool(((num_targets < 0) | (num_targets > labels.shape[1])).any()):
        raise ValueError(f"num_targets must lie in [0, T={labels.shape[1]}], got {num_targets.tolist()}")


def matching_cost(logits, pred_boxes, labels, boxes, num_targets, w_class=1.0, w_bbox=5.0, w_giou=2.0):
    """DETR's matching cost for every (query, target) pair of every image.

    logits [*, B, Q, C] and pred_boxes [*, B, Q, 4] (any leading dims, e.g. the L decoder layers); labels [B, T]
    int64, boxes [B, T, 4] cxcywh, num_targets [B] int64 -> cost [*, B, Q, T], float32 (float64 for float64
    logits):  w_bbox * L1 - w_class * softmax(logits)[label] - w_giou * GIoU. Columns t >= num_targets[b] hold +inf.
    """
    if logits.dim() < 3 or pred_boxes.shape != (*logits.shape[:-1], 4):
        raise ValueError(f"logits [*, B, Q, C] and pred_boxes [*, B, Q, 4] expected, got "
                         f"{tuple(logits.shape)} and {tuple(pred_boxes.shape)}")
    _check_targets(labels, boxes, num_targets, logits.shape[-3])
    num_classes = logits.shape[-1]
    valid = torch.arange(labels.shape[1], device=labels.device)[None, :] < num_targets[:, None]  # [B, T]
    if bool(((labels < 0) | (labels >= num_classes))[valid].any()):
        raise ValueError(f"labels must lie in [0, {num_classes}) for real targets")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    prob = logits.to(dtype).softmax(-1)  # [*, B, Q, C]
    pred = pred_boxes.to(dtype)
    tgt = boxes.to(dtype)
    B, T = labels.shape
    Q = logits.shape[-2]
    index = labels.clamp(0, num_classes - 1)[:, None, :].expand(*logits.shape[:-2], Q, T)
    cost_class = -prob.gather(-1, index)  # [*, B, Q, T]
    cost_bbox = (pred[..., :, None, :] - tgt[:, None, :, :]).abs().sum(-1)  # [*, B, Q, T]
    cost_giou = -generalized_box_iou(pred, tgt)  # [*, B, Q, T]
    cost = w_bbox * cost_bbox + w_class * cost_class + w_giou * cost_giou
    return cost.masked_fill(~valid[:, None, :], float("inf"))


def linear_assignment(cost, num_targets):
    """Optimal one-to-one assignment of the num_targets[b] first targets of each image to distinct queries.

    cost [*, B, Q, T] (any leading dims), num_targets [B] int64 -> assignment [*, B, Q] int64 on cost's device:
    the target index matched to each query, -1 for none. Minimizes the total cost (scipy's
    linear_sum_assignment per problem, on the costs converted to float64). Raises ValueError for NaN or infinite
    costs among the real targets, or for num_targets above Q.
    """
    from scipy.optimize import linear_sum_assignment

    if cost.dim() < 3:
        raise ValueError(f"cost must be [*, B, Q, T], got {tuple(cost.shape)}")
    B, Q, T = cost.shape[-3:]
    if num_targets.shape != (B,):
        raise ValueError(f"num_targets must be [B={B}], got {tuple(num_targets.shape)}")
    n = num_targets.detach().cpu().numpy()
    if (n < 0).any() or (n > T).any():
        raise ValueError(f"num_targets must lie in [0, T={T}], got {n.tolist()}")
    if (n > Q).any():
        raise ValueError(f"more targets than queries: num_targets {n.max()} > Q={Q}")
    P = int(np.prod(cost.shape[:-3], dtype=np.int64))  # leading problems (e.g. decoder layers)
    c = cost.detach().to("cpu", torch.float64).reshape(P, B, Q, T).numpy()
    out = np.full((c.shape[0], B, Q), -1, dtype=np.int64)
    for p in range(c.shape[0]):
        for b in range(B):
            k = int(n[b])
            if k == 0:
                continue
            sub = c[p, b, :, :k]
            if not np.isfinite(sub).all():
                raise ValueError("cost holds NaN or infinite values among real targets")
            rows, cols = linear_sum_assignment(sub)
            out[p, b, rows] = cols
    return torch.from_numpy(out).reshape(*cost.shape[:-1]).to(cost.device)


def box_loss(pred, target):
    """Per-pair box losses: pred [N, 4], target [N, 4] cxcywh -> (l1 [N], giou_loss [N]).

    l1 is the sum over the four coordinates of |pred - target|; giou_loss = 1 - GIoU(pred, target).
    """
    if pred.shape != target.shape or pred.dim() != 2 or pred.shape[-1] != 4:
        raise ValueError(f"pred and target must both be [N, 4], got {tuple(pred.shape)} and {tuple(target.shape)}")
    l1 = (pred - target).abs().sum(-1)
    return l1, 1 - elementwise_giou(pred, target)


def attention(q, k, v, key_padding_mask=None, dropout_p=0.0, *, dropout_mask=None):
    """Scaled dot-product attention over heads.

    q [B, H, Lq, D], k and v [B, H, Lk, D], key_padding_mask [B, Lk] bool (True = padded key, never attended).
    Returns [B, H, Lq, D] in q's dtype. A query whose keys are all padded gets output 0 (and zero gradients).
    Dropout on the attention weights: dropout_mask [B, H, Lq, Lk] bool (True = kept) applies that mask, scaled by
    1 / (1 - dropout_p); otherwise dropout_p > 0 draws one with torch's generator.
    """
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q [B,H,Lq,D], k/v [B,H,Lk,D] expected, got {tuple(q.shape)} {tuple(k.shape)} "
                         f"{tuple(v.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
    empty = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (q.shape[0], k.shape[2]) or key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be bool [B, Lk], got {key_padding_mask.dtype} "
                             f"{tuple(key_padding_mask.shape)}")
        empty = key_padding_mask.all(-1)  # [B]: images whose every key is padding
        mask = key_padding_mask & ~empty[:, None]
        scores = scores.masked_fill(mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    if dropout_mask is not None:
        probs = probs * dropout_mask.to(probs.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    out = torch.matmul(probs, v)
    if empty is not None:
        out = out * (~empty).to(out.dtype)[:, None, None, None]
    return out


def add_dropout_layernorm(x, residual, weight, bias, p=0.0, training=False, eps=1e-5, *, dropout_mask=None):
    """layer_norm(residual + dropout(x)) over the last dimension.

    x, residual [..., d] of one dtype, or a float16/bfloat16 x with a float32 residual (then x is promoted: the sum
    and the result are float32); weight, bias [d] (x's dtype or float32); returns [..., d] in the residual's dtype.
    Dropout acts when training and p > 0: dropout_mask [..., d] bool (True = kept; or any shape that reshapes to
    x's, such as the op's [rows, d] mask) applies that mask with kept values scaled by 1 / (1 - p); otherwise one is
    drawn with torch's generator. Parameters in float32 with low-precision x: the normalization runs in float32 and
    the result is rounded to x's dtype; with parameters in x's dtype this is exactly F.layer_norm(residual + x).
    """
    if x.dim() < 1 or x.shape[-1] < 1 or residual.shape != x.shape:
        raise ValueError(f"x and residual must both be [..., d] with d >= 1, got {tuple(x.shape)} and "
                         f"{tuple(residual.shape)}")
    mixed = x.dtype in (torch.float16, torch.bfloat16) and residual.dtype == torch.float32
    if residual.dtype != x.dtype and not mixed:
        raise ValueError(f"x and residual must share one dtype (or be a float16/bfloat16 x with a float32 residual), "
                         f"got {x.dtype} and {residual.dtype}")
    d = x.shape[-1]
    if weight.shape != (d,) or bias.shape != (d,):
        raise ValueError(f"weight and bias must have shape [d] = [{d}], got {tuple(weight.shape)} and "
                         f"{tuple(bias.shape)}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must lie in [0, 1), got {p}")
    if mixed:
        x = x.to(residual.dtype)  # dropout's scaling and the sum in float32, as the kernels compute them
    if training and p > 0:
        if dropout_mask is not None:
            x = x * dropout_mask.reshape(x.shape).to(x.dtype) / (1.0 - p)
        else:
            x = F.dropout(x, p)
    h = residual + x
    if weight.dtype == h.dtype and bias.dtype == h.dtype:
        return F.layer_norm(h, (d,), weight, bias, eps)
    return F.layer_norm(h.to(weight.dtype), (d,), weight, bias.to(weight.dtype), eps).to(h.dtype)


def relu_dropout(x, p=0.0, training=False, *, dropout_mask=None):
    """dropout(relu(x), p): F.relu then dropout when training and p > 0, with the given keep mask dropout_mask (bool,
    x's shape or one that reshapes to it, such as the op's [rows, d] mask; kept values scaled by 1 / (1 - p)) or one
    drawn with torch's generator."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must lie in [0, 1), got {p}")
    y = F.relu(x)
    if training and p > 0:
        if dropout_mask is not None:
            return y * dropout_mask.reshape(x.shape).to(y.dtype) / (1.0 - p)
        return F.dropout(y, p)
    return y


def bias_act(x, bias, residual=None, relu=True):
    """relu(x + bias + residual) with bias [C] broadcast over dimension 1 (the channels) of x [N, C, ...].

    residual (optional) has x's shape and dtype; relu=False leaves out the activation. Computed as eager PyTorch
    computes a convolution's bias, a residual add and a ReLU: each step in x's dtype (the bias cast to it first).
    """
    if x.dim() < 2:
        raise ValueError(f"x must have shape [N, C, ...], got {tuple(x.shape)}")
    if bias.shape != (x.shape[1],):
        raise ValueError(f"bias must have shape [C] = [{x.shape[1]}], got {tuple(bias.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must have x's shape {tuple(x.shape)} and dtype {x.dtype}, got "
                         f"{tuple(residual.shape)} and {residual.dtype}")
    y = x + bias.to(x.dtype).view([1, -1] + [1] * (x.dim() - 2))
    if residual is not None:
        y = y + residual
    return y.relu() if relu else y


def relu_backward_sum(grad_a, grad_b, out):
    """The gradient reaching a ReLU's output `out` along two paths, summed and masked: (grad_a + grad_b) where
    out > 0, else 0, as autograd computes it (the sum in the tensors' dtype, then threshold_backward)."""
    if not (grad_a.shape == grad_b.shape == out.shape):
        raise ValueError(f"grad_a, grad_b and out must have one shape, got {tuple(grad_a.shape)}, "
                         f"{tuple(grad_b.shape)} and {tuple(out.shape)}")
    if not (grad_a.dtype == grad_b.dtype == out.dtype):
        raise ValueError(f"grad_a, grad_b and out must have one dtype, got {grad_a.dtype}, {grad_b.dtype} and "
                         f"{out.dtype}")
    return torch.ops.aten.threshold_backward(grad_a + grad_b, out, 0)


def scale_many(xs, scale, dtype):
    """[x * scale[channels of x] in dtype for x in xs]: dimension 0 of each x is its channel, x's channels follow the
    previous tensor's in scale. Each product in float32 (float64 when an operand or dtype is float64) rounded once to
    dtype, as torch.mul(x, s, out=...) computes it; each output keeps its input's memory format."""
    xs = list(xs)
    if scale.dim() != 1 or scale.numel() != sum(x.shape[0] for x in xs):
        raise ValueError(f"scale must be 1-D with one value per channel of all tensors "
                         f"({sum(x.shape[0] for x in xs)}), got shape {tuple(scale.shape)}")
    acc = torch.float64 if torch.float64 in {scale.dtype, dtype} | {x.dtype for x in xs} else torch.float32
    out, off = [], 0
    for x in xs:
        c = x.shape[0]
        s = scale[off:off + c].to(acc).view([c] + [1] * (x.dim() - 1))
        y = torch.empty_like(x, dtype=dtype)
        torch.mul(x, s, out=y)  # promoted to acc (s is in it), rounded once to dtype
        out.append(y)
        off += c
    return out


def max_pool2d_nhwc(x, kernel, stride, padding):
    """torch's max_pool2d (dilation 1, floor mode) on a channels_last x, the output channels_last."""
    if x.dim() != 4:
        raise ValueError(f"x must have shape [N, C, H, W], got {tuple(x.shape)}")
    out = torch.nn.functional.max_pool2d(x, kernel, stride, padding)
    return out.contiguous(memory_format=torch.channels_last)


def space_to_depth(x, kernel, padding, channels, dtype, memory_format=torch.channels_last):
    """The space-to-depth input of a stride-2 convolution of x [B, C, H, W] with an odd kernel and padding (ph, pw):
    S [B, channels, Hs, Ws] in dtype and memory_format, S[b, 4c + 2r + s, Y, X] = x[b, c, 2Y + r - ph, 2X + s - pw]
    (zero outside x and in channels 4C and up), Hs = (H + 2 ph - kernel) // 2 + (kernel + 1) // 2 (Ws alike). The
    stride-2 convolution is then a stride-1, unpadded one over S with a (kernel + 1) // 2 kernel. One zero fill and
    one strided copy (with the cast) per parity (r, s)."""
    if x.dim() != 4:
        raise ValueError(f"x must have shape [B, C, H, W], got {tuple(x.shape)}")
    b, c, h, w = x.shape
    ph, pw = padding
    if kernel < 1 or kernel % 2 == 0 or h + 2 * ph < kernel or w + 2 * pw < kernel or channels < 4 * c:
        raise ValueError(f"space_to_depth: bad kernel {kernel}, padding {padding} or channels {channels} for "
                         f"{tuple(x.shape)}")
    half = (kernel + 1) // 2
    hs, ws = (h + 2 * ph - kernel) // 2 + half, (w + 2 * pw - kernel) // 2 + half
    out = torch.zeros((b, channels, hs, ws), dtype=dtype, device=x.device).contiguous(memory_format=memory_format)

    def span(p: int, r: int, n: int, size: int) -> tuple[int, int, int]:
        """(first S index, its source index in x, count) along a dimension: the S positions Y of parity r with
        0 <= 2Y + r - p < n, Y < size."""
        y0 = max(0, (p - r + 1) // 2)
        src0 = 2 * y0 + r - p
        return y0, src0, min(size - y0, (n - src0 + 1) // 2)

    for r in (0, 1):
        y0, row0, ny = span(ph, r, h, hs)
        for s in (0, 1):
            x0, col0, nx = span(pw, s, w, ws)
            if ny > 0 and nx > 0:
                out[:, r * 2 + s:4 * c:4, y0:y0 + ny, x0:x0 + nx].copy_(
                    x[:, :, row0:row0 + 2 * ny - 1:2, col0:col0 + 2 * nx - 1:2])
    return out
