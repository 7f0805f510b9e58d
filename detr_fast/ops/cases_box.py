"""Validation and benchmark cases of matching_cost and box_loss, plus the box generators the tests share.

Rules: outputs are compared with the reference computed in float64 on the same (upcast) inputs, as
max |ours - ref| / (1 + |ref|) over finite entries, with the +inf (padding) pattern required to match exactly.
Tolerance 1e-6 for float64 and 1e-5 for float32. Both ops compute fp16/bf16 inputs in fp32 by contract, so:
matching_cost keeps the fp32 tolerance for them (its reference upcasts too); box_loss, whose reference computes in
the input precision, must be within twice the error of the reference computed in that low precision.
"""
from __future__ import annotations

import math

import torch

from detr_fast.ops import reference
from detr_fast.ops.registry import Case, register

NUM_CLASSES = 92  # COCO's 91 ids + "no object"
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _rand(gen, *shape):
    return torch.rand(*shape, generator=gen, dtype=torch.float64)


def random_boxes(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """[*shape, 4] cxcywh boxes like a sigmoid head's: centres in (0, 1), sizes in (0.02, 0.6)."""
    cxcy = _rand(gen, *shape, 2)
    wh = 0.02 + 0.58 * _rand(gen, *shape, 2)
    return torch.cat((cxcy, wh), -1)


# Degenerate pair kinds, for box_loss and for matching_cost rows. Each makes (pred, target) from a random pair.
def _pair_kinds():
    def identical(p, t):
        return t.clone(), t

    def pred_zero_width(p, t):
        p = p.clone()
        p[2] = 0
        return p, t

    def target_zero_height(p, t):
        t = t.clone()
        t[3] = 0
        return p, t

    def both_points_same(p, t):
        t = t.clone()
        t[2:] = 0
        return t.clone(), t

    def both_points_apart(p, t):
        p, t = p.clone(), t.clone()
        p[2:] = 0
        t[2:] = 0
        return p, t

    def disjoint(p, t):
        p = p.clone()
        p[0] = t[0] + 0.5 * t[2] + 0.5 * p[2] + 0.25  # entirely to the right, with a gap
        return p, t

    def pred_inside(p, t):
        p = t.clone()
        p[2:] = t[2:] * 0.4
        return p, t

    def target_inside(p, t):
        t = p.clone()
        t[2:] = p[2:] * 0.3
        return p, t

    def share_edge(p, t):
        p = t.clone()
        p[0] = t[0] + t[2]  # same height, side by side
        return p, t

    def touch_corner(p, t):
        p = t.clone()
        p[0] = t[0] + t[2]
        p[1] = t[1] + t[3]
        return p, t

    def point_on_edge(p, t):
        p = t.clone()
        p[0] = t[0] + 0.5 * t[2]
        p[2:] = 0
        return p, t

    return [identical, pred_zero_width, target_zero_height, both_points_same, both_points_apart, disjoint,
            pred_inside, target_inside, share_edge, touch_corner, point_on_edge]


DEGENERATE_KINDS = len(_pair_kinds())


def box_pairs(gen: torch.Generator, n: int, degenerate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """pred [n, 4], target [n, 4] float64 cxcywh. With degenerate=True, rows i % 16 < 11 are the degenerate kinds
    (identical, zero width, zero height, points, disjoint, contained both ways, shared edge, shared corner)."""
    pred, target = random_boxes(gen, n), random_boxes(gen, n)
    if degenerate:
        kinds = _pair_kinds()
        for i in range(n):
            if i % 16 < len(kinds):
                pred[i], target[i] = kinds[i % 16](pred[i], target[i])
    return pred, target


def matching_inputs(gen: torch.Generator, lead: tuple, B: int, Q: int, C: int, T: int, degenerate: bool = True,
                    num_targets: torch.Tensor | None = None):
    """Random matching_cost inputs in float64: logits [*lead, B, Q, C], pred_boxes [*lead, B, Q, 4], labels [B, T],
    boxes [B, T, 4], num_targets [B]. Padded rows hold labels -1 and random boxes. With degenerate=True, a few
    queries of every image are degenerate against its first target (identical, empty, disjoint, contained) and
    targets 1 and 2 have zero width / are points."""
    logits = 3 * torch.randn(*lead, B, Q, C, generator=gen, dtype=torch.float64)
    pred = random_boxes(gen, *lead, B, Q)
    boxes = random_boxes(gen, B, T)
    labels = torch.randint(0, C, (B, T), generator=gen)
    if num_targets is None:
        num_targets = torch.randint(0, T + 1, (B,), generator=gen)
        if B >= 2:
            num_targets[0], num_targets[1] = T, 0
    if degenerate and T > 0:
        kinds = _pair_kinds()
        for q in range(min(Q, len(kinds))):
            for b in range(B):
                p, _ = kinds[q](pred[..., b, q, :].reshape(-1, 4)[0], boxes[b, 0])
                pred[..., b, q, :] = p
        if T > 1:
            boxes[:, 1, 2] = 0
        if T > 2:
            boxes[:, 2, 2:] = 0
    valid = torch.arange(T)[None, :] < num_targets[:, None]
    labels = labels.masked_fill(~valid, -1)
    return logits, pred, labels, boxes, num_targets


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / (1 + |ref|) over finite entries; inf if the non-finite patterns differ."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        return math.inf
    if not torch.equal(out.isinf(), ref.isinf()) or not torch.equal(out.isnan(), ref.isnan()):
        return math.inf
    if torch.isinf(out).any() and not torch.equal(out[out.isinf()], ref[ref.isinf()]):
        return math.inf
    fin = torch.isfinite(ref)
    if not fin.any():
        return 0.0
    return float(((out - ref).abs() / (1 + ref.abs()))[fin].max())


def _tol(dtype: torch.dtype) -> float:
    return 1e-6 if dtype == torch.float64 else 1e-5


def _mc_make(lead, B, Q, C, T, degenerate):
    def make(device, dtype, gen):
        logits, pred, labels, boxes, num = matching_inputs(gen, lead, B, Q, C, T, degenerate)
        box_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        args = (logits.to(device, dtype), pred.to(device, dtype), labels.to(device), boxes.to(device, box_dtype),
                num.to(device))
        return args, {"w_class": 1.0, "w_bbox": 5.0, "w_giou": 2.0}
    return make


def _mc_check(out, args, kwargs, dtype):
    logits, pred, labels, boxes, num = args
    if out.dtype != (torch.float64 if dtype == torch.float64 else torch.float32):
        return math.inf, _tol(dtype)
    ref = reference.matching_cost(logits.double(), pred.double(), labels, boxes.double(), num, **kwargs)
    return _rel_err(out, ref), _tol(dtype)


def _bl_make(n, degenerate):
    def make(device, dtype, gen):
        pred, target = box_pairs(gen, n, degenerate)
        return (pred.to(device, dtype), target.to(device, dtype)), {}
    return make


def _bl_check(out, args, kwargs, dtype):
    pred, target = args
    ref = reference.box_loss(pred.double(), target.double())
    want = torch.float64 if dtype == torch.float64 else torch.float32
    if any(o.dtype != want for o in out):
        return math.inf, _tol(dtype)
    err = max(_rel_err(o, r) for o, r in zip(out, ref))
    if dtype in LOW_PRECISION:
        low = reference.box_loss(pred, target)  # the reference computed in the low precision
        return err, 2 * max(_rel_err(o, r) for o, r in zip(low, ref))
    return err, _tol(dtype)


ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# Validation cases: odd sizes, every degenerate kind, padding, stacked layers.
for _lead, _B, _Q, _C, _T in [((), 3, 17, 7, 5), ((2,), 5, 33, 92, 13), ((6,), 2, 100, 92, 30), ((), 4, 9, 3, 70)]:
    register(Case(op="matching_cost", name=f"L={_lead[0] if _lead else 1} B={_B} Q={_Q} C={_C} T={_T} degenerate",
                  make=_mc_make(_lead, _B, _Q, _C, _T, True), check=_mc_check, dtypes=ALL_DTYPES,
                  tags=("cpu_half",)))
for _n in (1, 97, 1025):
    register(Case(op="box_loss", name=f"N={_n} degenerate", make=_bl_make(_n, True), check=_bl_check,
                  dtypes=ALL_DTYPES, tags=("cpu_half",), grad_args=(0,)))

# Benchmark shapes (DESIGN.md section 5): Q = 100 queries, C = 92 classes, B images with T padded targets, L layers.
for _B in (8, 64):
    for _T in (7, 30):
        for _L in (1, 6):
            register(Case(op="matching_cost", name=f"L={_L} B={_B} Q=100 T={_T}",
                          make=_mc_make((_L,) if _L > 1 else (), _B, 100, NUM_CLASSES, _T, False), check=_mc_check,
                          dtypes=(torch.float32,), tags=("bench",)))
for _B, _T in ((8, 7), (64, 30)):
    for _L in (1, 6):
        _n = _L * _B * _T
        register(Case(op="box_loss", name=f"N={_n} (L={_L} B={_B} T={_T})", make=_bl_make(_n, False),
                      check=_bl_check, dtypes=(torch.float32,), tags=("bench",), grad_args=(0,)))
# The criterion's call: every query of every layer, the unmatched ones masked afterwards (no sync, fixed shape).
for _B in (8, 64):
    _n = 6 * _B * 100
    register(Case(op="box_loss", name=f"N={_n} (L=6 B={_B} Q=100)", make=_bl_make(_n, False), check=_bl_check,
                  dtypes=(torch.float32,), tags=("bench",), grad_args=(0,)))
