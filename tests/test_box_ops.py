"""matching_cost and box_loss kernels (csrc/box_ops): the same tests on the CPU kernel and, where there is a GPU, on
the CUDA kernel, against detr_fast.ops.reference (and torchvision's GIoU loss as an independent oracle)."""
import math

import pytest
import torch
from helpers import cpu_and_cuda
from torchvision.ops import generalized_box_iou_loss

from detr_fast import ops
from detr_fast.ops import reference
from detr_fast.ops.cases_box import box_pairs, matching_inputs, random_boxes
from detr_fast.ops.registry import cases, run_case

TOL = {torch.float64: 1e-6, torch.float32: 1e-5}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected, rtol=TOL[dtype], atol=TOL[dtype])


def _mc_inputs(device, dtype, lead=(), B=3, Q=17, C=7, T=5, seed=0, degenerate=True, num_targets=None):
    logits, pred, labels, boxes, num = matching_inputs(_gen(seed), lead, B, Q, C, T, degenerate, num_targets)
    return (logits.to(device, dtype), pred.to(device, dtype), labels.to(device), boxes.to(device, dtype),
            num.to(device))


def _xyxy(b):
    return reference.box_cxcywh_to_xyxy(b)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_kernels_are_built(device):
    # Every other test calls detr_fast.ops, which would silently fall back to the reference without a kernel.
    assert ops.has_kernel("matching_cost", device)
    assert ops.has_kernel("box_loss", device)
    assert ops.has_kernel("box_loss_backward", device)


# ---------------------------------------------------------------- matching_cost


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [((), 3, 17, 7, 5), ((2,), 4, 33, 92, 13), ((), 1, 1, 1, 1), ((), 2, 5, 3, 70),
                                   ((2, 3), 2, 65, 11, 3)])
def test_matching_cost_matches_reference(device, dtype, shape):
    lead, B, Q, C, T = shape
    args = _mc_inputs(device, dtype, lead, B, Q, C, T, seed=B * Q + T)
    out = ops.matching_cost(*args, w_class=1.5, w_bbox=4.0, w_giou=3.0)
    ref = reference.matching_cost(*args, w_class=1.5, w_bbox=4.0, w_giou=3.0)
    assert out.shape == (*lead, B, Q, T) and out.dtype == dtype and out.device == args[0].device
    assert not out.requires_grad
    _close(out, ref, dtype)  # +inf (padding) must sit at the same places


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_matching_cost_independent_formula(device):
    # Build the cost from torchvision's GIoU loss and plain PyTorch on non-degenerate boxes: checks the reference
    # and the kernel against code that shares nothing with them.
    B, Q, C, T = 2, 11, 6, 4
    logits, pred, labels, boxes, num = _mc_inputs(device, torch.float64, (), B, Q, C, T, degenerate=False,
                                                  num_targets=torch.tensor([4, 3]))
    out = ops.matching_cost(logits, pred, labels, boxes, num, w_class=1.0, w_bbox=5.0, w_giou=2.0)
    for b in range(B):
        n = int(num[b])
        p = pred[b][:, None, :].expand(Q, n, 4).reshape(-1, 4)
        t = boxes[b, :n][None].expand(Q, n, 4).reshape(-1, 4)
        giou = 1 - generalized_box_iou_loss(_xyxy(p), _xyxy(t), eps=1e-7).reshape(Q, n)
        l1 = torch.cdist(pred[b], boxes[b, :n], p=1)
        prob = logits[b].softmax(-1)[:, labels[b, :n]]
        _close(out[b, :, :n], 5.0 * l1 - prob - 2.0 * giou, torch.float64)
        assert torch.isinf(out[b, :, n:]).all() and (out[b, :, n:] > 0).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", [c for c in cases(op="matching_cost")] + [c for c in cases(op="box_loss")],
                         ids=lambda c: f"{c.op}[{c.name}]")
def test_registry_cases(device, case):
    if device not in case.devices:
        pytest.skip("case not for this device")
    for i, dtype in enumerate(case.dtypes):
        r = run_case(case, device, dtype, seed=17 + i)
        assert r.passed, f"{r.case} {r.dtype}: error {r.error} > tolerance {r.tolerance} {r.message}"


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_matching_cost_padding_never_leaks(device):
    logits, pred, labels, boxes, num = _mc_inputs(device, torch.float32, (2,), 4, 37, 9, 8, seed=3,
                                                  num_targets=torch.tensor([8, 0, 3, 5]))
    out = ops.matching_cost(logits, pred, labels, boxes, num)
    pad = torch.arange(8, device=num.device)[None, :] >= num[:, None]  # [B, T]
    # Garbage in the padded rows: labels out of range, NaN / inf / huge boxes.
    labels2, boxes2 = labels.clone(), boxes.clone()
    labels2[pad] = torch.tensor([-5, 10**12, 9, 1], device=labels.device).repeat(int(pad.sum()))[: int(pad.sum())]
    garbage = torch.tensor([[math.nan, math.inf, -1e30, 1e30]], device=boxes.device)
    boxes2[pad] = garbage.expand(int(pad.sum()), 4)
    out2 = ops.matching_cost(logits, pred, labels2, boxes2, num)
    assert torch.equal(out, out2)
    padded = out2.masked_select(pad[None, :, None, :].expand_as(out2))
    assert padded.numel() > 0 and torch.isposinf(padded).all()
    assert torch.isfinite(out2.masked_select(~pad[None, :, None, :].expand_as(out2))).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_matching_cost_stacked_equals_per_layer(device):
    logits, pred, labels, boxes, num = _mc_inputs(device, torch.float32, (6,), 5, 100, 92, 30, seed=4)
    stacked = ops.matching_cost(logits, pred, labels, boxes, num)  # [6, B, Q, T], one launch
    per_layer = torch.stack([ops.matching_cost(logits[i], pred[i], labels, boxes, num) for i in range(6)])
    assert torch.equal(stacked, per_layer)
    two_dims = ops.matching_cost(logits.reshape(2, 3, *logits.shape[1:]), pred.reshape(2, 3, *pred.shape[1:]),
                                 labels, boxes, num)
    assert torch.equal(two_dims.reshape(stacked.shape), stacked)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("lead,B,Q,T", [((), 0, 10, 5), ((), 3, 10, 0), ((), 3, 0, 5), ((0,), 3, 10, 5),
                                        ((2,), 0, 4, 0)])
def test_matching_cost_empty(device, lead, B, Q, T):
    C = 5
    logits = torch.randn(*lead, B, Q, C, device=device)
    pred = torch.rand(*lead, B, Q, 4, device=device)
    labels = torch.zeros(B, T, dtype=torch.int64, device=device)
    boxes = torch.rand(B, T, 4, device=device)
    num = torch.full((B,), T, dtype=torch.int64, device=device)
    out = ops.matching_cost(logits, pred, labels, boxes, num)
    assert out.shape == (*lead, B, Q, T) and out.dtype == torch.float32
    assert torch.equal(out, reference.matching_cost(logits, pred, labels, boxes, num))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_matching_cost_noncontiguous(device):
    logits, pred, labels, boxes, num = _mc_inputs(device, torch.float32, (2,), 3, 21, 7, 6, seed=5)
    nc_logits = logits.transpose(-1, -2).contiguous().transpose(-1, -2)  # [L, B, Q, C] with C strided
    nc_pred = torch.cat((pred, pred), -1)[..., 4:]  # row stride 8
    nc_labels = labels.t().contiguous().t()
    nc_boxes = torch.stack((boxes, boxes), -2)[..., 1, :]
    nc_num = torch.stack((num, num), -1)[:, 0]
    assert not any(t.is_contiguous() for t in (nc_logits, nc_pred, nc_labels, nc_boxes, nc_num))
    out = ops.matching_cost(nc_logits, nc_pred, nc_labels, nc_boxes, nc_num)
    assert torch.equal(out, ops.matching_cost(logits, pred, labels, boxes, num))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matching_cost_low_precision(device, dtype):
    # Computed in fp32 by contract: equal to the fp32 reference on the upcast inputs at the fp32 tolerance.
    logits, pred, labels, boxes, num = _mc_inputs(device, dtype, (3,), 4, 50, 92, 9, seed=6)
    out = ops.matching_cost(logits, pred, labels, boxes.float(), num)
    assert out.dtype == torch.float32
    ref = reference.matching_cost(logits.float(), pred.float(), labels, boxes.float(), num)
    _close(out, ref, torch.float32)
    # Mixed dtypes (bf16 heads, fp32 targets or fp32 boxes) take the same path.
    out_mixed = ops.matching_cost(logits, pred.float(), labels, boxes, num)
    _close(out_mixed, ref, torch.float32)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_matching_cost_nan_propagates(device):
    logits, pred, labels, boxes, num = _mc_inputs(device, torch.float32, (), 3, 12, 5, 4, seed=7,
                                                  num_targets=torch.tensor([4, 2, 4]))
    logits[0, 3, 1] = math.nan
    pred[1, 5, 2] = math.nan
    boxes[2, 1, 0] = math.nan
    out = ops.matching_cost(logits, pred, labels, boxes, num)
    nan = torch.zeros_like(out, dtype=torch.bool)
    nan[0, 3, :] = True
    nan[1, 5, :2] = True  # padded columns stay +inf
    nan[2, :, 1] = True
    assert torch.equal(out.isnan(), nan)
    assert torch.isposinf(out[1, :, 2:]).all()
    ref = reference.matching_cost(logits, pred, labels, boxes, num)
    assert torch.equal(ref.isnan(), nan)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_matching_cost_bad_shapes_and_dtypes(device):
    logits, pred, labels, boxes, num = _mc_inputs(device, torch.float32, (), 3, 12, 5, 4, seed=8)
    bad = [
        (logits[0], pred[0], labels, boxes, num),  # logits 2-D
        (logits, pred[..., :3], labels, boxes, num),  # boxes with 3 coordinates
        (logits, pred[:, :5], labels, boxes, num),  # Q mismatch
        (logits, pred, labels.int(), boxes, num),  # labels int32
        (logits, pred, labels, boxes[:, :3], num),  # T mismatch
        (logits, pred, labels, boxes, num.int()),  # num_targets int32
        (logits, pred, labels, boxes, num[:2]),  # B mismatch
        (logits[:2], pred[:2], labels, boxes, num),  # predictions for 2 images, targets for 3
        (logits.long(), pred, labels, boxes, num),  # integer logits
        (logits[..., :0], pred, labels, boxes, num),  # no classes
    ]
    for args in bad:
        with pytest.raises(ValueError, match="matching_cost"):
            ops.matching_cost(*args)


def test_matching_cost_device_mismatch_raises():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    logits, pred, labels, boxes, num = _mc_inputs("cuda", torch.float32, (), 2, 5, 3, 2)
    with pytest.raises(ValueError, match="same device"):
        ops.matching_cost(logits, pred, labels.cpu(), boxes, num)


def _invalid_targets(device):
    logits, pred, labels, boxes, num = _mc_inputs(device, torch.float32, (), 4, 9, 5, 3, seed=9,
                                                  num_targets=torch.tensor([3, 3, 3, 2]))
    bad_label = labels.clone()
    bad_label[1, 2] = 5  # == C, a real target
    bad_label[3, 2] = 99  # padding: ignored
    bad_num = num.clone()
    bad_num[2] = 4  # > T
    neg_num = num.clone()
    neg_num[0] = -1
    return (logits, pred, labels, boxes, num), bad_label, bad_num, neg_num


def test_matching_cost_invalid_target_values_raise_on_cpu():
    (logits, pred, labels, boxes, num), bad_label, bad_num, neg_num = _invalid_targets("cpu")
    with pytest.raises(ValueError, match="labels must lie in"):
        ops.matching_cost(logits, pred, bad_label, boxes, num)
    with pytest.raises(ValueError, match="num_targets must lie in"):
        ops.matching_cost(logits, pred, labels, boxes, bad_num)
    with pytest.raises(ValueError, match="num_targets must lie in"):
        ops.matching_cost(logits, pred, labels, boxes, neg_num)
    labels_neg = labels.clone()
    labels_neg[0, 0] = -1
    with pytest.raises(ValueError, match="labels must lie in"):
        ops.matching_cost(logits, pred, labels_neg, boxes, num)


@pytest.mark.needs_cuda
def test_matching_cost_invalid_target_values_give_nan_on_cuda():
    # No host sync on CUDA: invalid columns become NaN (linear_assignment rejects them); the rest is unchanged.
    (logits, pred, labels, boxes, num), bad_label, bad_num, neg_num = _invalid_targets("cuda")
    good = ops.matching_cost(logits, pred, labels, boxes, num)
    out = ops.matching_cost(logits, pred, bad_label, boxes, num)
    assert out[1, :, 2].isnan().all()
    keep = torch.ones_like(out, dtype=torch.bool)
    keep[1, :, 2] = False
    assert torch.equal(out[keep], good[keep])
    for n, b in ((bad_num, 2), (neg_num, 0)):
        out = ops.matching_cost(logits, pred, labels, boxes, n)
        assert out[b].isnan().all()
        others = [i for i in range(4) if i != b]
        assert torch.equal(out[others], good[others])


# ---------------------------------------------------------------- box_loss


def _box_loss_and_grads(fn, pred, target, w_l1, w_giou):
    p = pred.detach().clone().requires_grad_(True)
    t = target.detach().clone().requires_grad_(True)
    l1, gl = fn(p, t)
    gp, gt = torch.autograd.grad((l1 * w_l1).sum() + (gl * w_giou).sum(), (p, t))
    return l1.detach(), gl.detach(), gp, gt


def _torch_clamp_passes_at_bound() -> bool:
    """Whether this torch's clamp(min=0) passes the gradient at exactly 0 (torch < 2.14; box_math.h does not)."""
    x = torch.zeros(1, requires_grad=True)
    x.clamp(min=0).sum().backward()
    return bool(x.grad[0] == 1)


def _clamp_kinks(pred, target):
    """[N] bool: pairs where a clamped width or height of the reference's GIoU is exactly 0."""
    a, b = _xyxy(pred), _xyxy(target)
    raw = [torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0]),
           torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1]),
           torch.maximum(a[:, 2], b[:, 2]) - torch.minimum(a[:, 0], b[:, 0]),
           torch.maximum(a[:, 3], b[:, 3]) - torch.minimum(a[:, 1], b[:, 1])]
    return torch.stack(raw).eq(0).any(0)


def _grad_rows(pred, target):
    """[N] bool: the pairs whose gradients can be compared with this torch's autograd of the reference."""
    if not _torch_clamp_passes_at_bound():
        return torch.ones(pred.shape[0], dtype=torch.bool, device=pred.device)
    return ~(_clamp_kinks(pred, target) | _clamp_kinks(pred.double(), target.double()))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [1, 16, 97, 1025])
def test_box_loss_matches_reference(device, dtype, n):
    # Every degenerate kind (identical, empty, points, disjoint, contained, touching) plus random pairs; outputs and
    # both gradients, against the reference's autograd (the kernel mirrors its conventions at the kinks).
    pred, target = box_pairs(_gen(n), n, degenerate=True)
    pred, target = pred.to(device, dtype), target.to(device, dtype)
    g = _gen(n + 1)
    w_l1 = torch.randn(n, generator=g, dtype=torch.float64).to(device, dtype)
    w_giou = torch.randn(n, generator=g, dtype=torch.float64).to(device, dtype)
    ours = _box_loss_and_grads(ops.box_loss, pred, target, w_l1, w_giou)
    ref = _box_loss_and_grads(reference.box_loss, pred, target, w_l1, w_giou)
    # An older torch takes another subgradient where a clamp sits exactly at 0: compare the rest there.
    rows = _grad_rows(pred, target)
    for a, b in zip(ours, ref):
        assert a.dtype == dtype and a.shape == b.shape
        assert torch.isfinite(a).all()
        if a.dim() == 2:  # gradients: relative to the largest entry of the row (degenerate pairs reach ~1e6)
            scale = 1 + b.abs().amax(-1, keepdim=True)
            _close((a / scale)[rows], (b / scale)[rows], dtype)
        else:
            _close(a, b, dtype)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_box_loss_sum_backward(device):
    # (l1.sum() + giou.sum()).backward() hands the kernel expanded (stride-0) gradients.
    pred, target = box_pairs(_gen(11), 40)
    pred, target = pred.to(device), target.to(device)
    p1 = pred.clone().requires_grad_(True)
    l1, gl = ops.box_loss(p1, target)
    (l1.sum() + 3 * gl.sum()).backward()
    p2 = pred.clone().requires_grad_(True)
    l1r, glr = reference.box_loss(p2, target)
    (l1r.sum() + 3 * glr.sum()).backward()
    rows = _grad_rows(pred, target)
    _close(p1.grad[rows], p2.grad[rows], torch.float64)
    # Only one of the two losses used: the other's gradient is zero.
    p3 = pred.clone().requires_grad_(True)
    ops.box_loss(p3, target)[1].sum().backward()
    p4 = pred.clone().requires_grad_(True)
    reference.box_loss(p4, target)[1].sum().backward()
    _close(p3.grad[rows], p4.grad[rows], torch.float64)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_box_loss_matches_torchvision(device):
    pred, target = box_pairs(_gen(12), 301, degenerate=False)
    pred, target = pred.to(device), target.to(device)
    p1 = pred.clone().requires_grad_(True)
    l1, gl = ops.box_loss(p1, target)
    (gl * torch.linspace(-1, 2, 301, device=device, dtype=torch.float64)).sum().backward()
    p2 = pred.clone().requires_grad_(True)
    tv = generalized_box_iou_loss(_xyxy(p2), _xyxy(target), reduction="none", eps=1e-7)
    (tv * torch.linspace(-1, 2, 301, device=device, dtype=torch.float64)).sum().backward()
    _close(gl, tv.detach(), torch.float64)
    _close(p1.grad, p2.grad, torch.float64)
    _close(l1, (pred - target).abs().sum(-1), torch.float64)


# (pred xyxy, target xyxy, expected giou loss): identical; a quarter of the other; side by side sharing an edge;
# meeting at one corner with the enclosing box twice the union.
ANALYTIC = [
    ([0.1, 0.2, 0.6, 0.9], [0.1, 0.2, 0.6, 0.9], 0.0),
    ([0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0], 0.75),
    ([0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 2.0, 1.0], 1.0),
    ([0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 2.0, 2.0], 1.5),
    ([0.25, 0.25, 0.75, 0.75], [0.0, 0.0, 1.0, 1.0], 0.75),
]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_box_loss_analytic(device, dtype):
    pred = reference.box_xyxy_to_cxcywh(torch.tensor([a for a, _, _ in ANALYTIC], dtype=dtype, device=device))
    target = reference.box_xyxy_to_cxcywh(torch.tensor([b for _, b, _ in ANALYTIC], dtype=dtype, device=device))
    l1, gl = ops.box_loss(pred, target)
    _close(gl, torch.tensor([e for _, _, e in ANALYTIC], dtype=dtype, device=device), dtype)
    _close(l1, torch.tensor([0.0, 1.5, 1.0, 2.0, 1.0], dtype=dtype, device=device), dtype)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_box_loss_gradcheck(device, seed):
    pred, target = box_pairs(_gen(100 + seed), 9, degenerate=False)
    pred = pred.to(device).requires_grad_(True)
    target = target.to(device).requires_grad_(True)
    assert torch.autograd.gradcheck(ops.box_loss, (pred, target), eps=1e-6, atol=1e-5, rtol=1e-4)
    # Disjoint and contained pairs are smooth too (away from ties).
    tgt = random_boxes(_gen(200 + seed), 6).to(device)
    far = tgt.clone()
    far[:3, 0] += tgt[:3, 2] + 0.3
    far[:3, 1] += 0.05  # no tied edges: ties are kinks
    far[3:, 2:] *= 0.5
    far = far.requires_grad_(True)
    assert torch.autograd.gradcheck(ops.box_loss, (far, tgt), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_box_loss_nan_propagates(device):
    pred, target = box_pairs(_gen(13), 20)
    pred, target = pred.to(device).float(), target.to(device).float()
    pred[4, 1] = math.nan
    target[9, 3] = math.nan
    p = pred.clone().requires_grad_(True)
    l1, gl = ops.box_loss(p, target)
    (l1.sum() + gl.sum()).backward()
    rows = torch.zeros(20, dtype=torch.bool, device=device)
    rows[[4, 9]] = True
    assert torch.equal(l1.isnan(), rows) and torch.equal(gl.isnan(), rows)
    assert p.grad[rows].isnan().any(-1).all()
    assert torch.isfinite(p.grad[~rows]).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_box_loss_empty(device, dtype):
    pred = torch.zeros(0, 4, device=device, dtype=dtype, requires_grad=True)
    target = torch.zeros(0, 4, device=device, dtype=dtype)
    l1, gl = ops.box_loss(pred, target)
    assert l1.shape == (0,) and gl.shape == (0,)
    (l1.sum() + gl.sum()).backward()
    assert pred.grad.shape == (0, 4) and pred.grad.dtype == dtype


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_box_loss_noncontiguous(device):
    pred, target = box_pairs(_gen(14), 33)
    pred, target = pred.to(device).float(), target.to(device).float()
    nc_pred = torch.cat((target, pred), -1)[:, 4:]
    nc_target = target.t().contiguous().t()
    assert not nc_pred.is_contiguous() and not nc_target.is_contiguous()
    w = torch.linspace(-1, 1, 33, device=device)
    a = _box_loss_and_grads(ops.box_loss, nc_pred, nc_target, w, w.flip(0))
    b = _box_loss_and_grads(ops.box_loss, pred, target, w, w.flip(0))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # Strided upstream gradients reach the backward kernel as they are.
    grads = torch.randn(33, 2, device=device)
    g_nc = torch.ops.detr_fast.box_loss_backward(grads[:, 0], grads[:, 1], pred, target)
    g_c = torch.ops.detr_fast.box_loss_backward(grads[:, 0].contiguous(), grads[:, 1].contiguous(), pred, target)
    assert torch.equal(g_nc, g_c)


def _max_rel_err(a, b):
    a, b = a.double(), b.double()
    return float(((a - b).abs() / (1 + b.abs())).max())


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_box_loss_low_precision(device, dtype):
    # The 2x rule on ordinary pairs: error against the fp64 reference on the upcast inputs at most twice the error of
    # the reference computed in the low precision, for the outputs and the gradient.
    pred, target = box_pairs(_gen(15), 513, degenerate=False)
    pred, target = pred.to(device, dtype), target.to(device, dtype)
    w_l1 = torch.rand(513, device=device)
    w_giou = torch.rand(513, device=device)
    ours = _box_loss_and_grads(ops.box_loss, pred, target, w_l1, w_giou)
    exact = _box_loss_and_grads(reference.box_loss, pred.double(), target.double(), w_l1.double(), w_giou.double())
    low = _box_loss_and_grads(reference.box_loss, pred, target, w_l1.to(dtype), w_giou.to(dtype))
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32 and ours[2].dtype == dtype
    rows = _grad_rows(pred, target)
    for o, e, l in zip(ours, exact, low):
        if o.dim() == 2:
            o, e, l = o[rows], e[rows], l[rows]
        assert torch.isfinite(l).all()  # so that the bound below is a real one
        assert _max_rel_err(o, e) <= 2 * _max_rel_err(l, e)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_box_loss_low_precision_degenerate(device, dtype):
    # Degenerate pairs, where the reference computed in fp16/bf16 overflows (1 / eps): the op computes in fp32, so it
    # equals the fp32 reference on the upcast inputs, and its gradient is that gradient rounded to the low precision.
    pred, target = box_pairs(_gen(19), 160)
    pred, target = pred.to(device, dtype), target.to(device, dtype)
    w_l1 = torch.rand(160, device=device)
    w_giou = torch.rand(160, device=device)
    ours = _box_loss_and_grads(ops.box_loss, pred, target, w_l1, w_giou)
    ref = _box_loss_and_grads(reference.box_loss, pred.float(), target.float(), w_l1, w_giou)
    _close(ours[0], ref[0], torch.float32)
    _close(ours[1], ref[1], torch.float32)
    rows = _grad_rows(pred.float(), target.float())
    ulp = torch.finfo(dtype).eps
    for o, r in zip(ours[2:], ref[2:]):
        assert o.dtype == dtype and torch.isfinite(o).all()
        scale = 1 + r.abs().amax(-1, keepdim=True)
        torch.testing.assert_close((o.float() / scale)[rows], (r / scale)[rows], rtol=ulp, atol=1e-5)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_box_loss_mixed_dtypes_and_autocast(device):
    pred, target = box_pairs(_gen(16), 50, degenerate=False)
    pred, target = pred.to(device).float(), target.to(device).float()
    head = torch.nn.Linear(4, 4).to(device)
    amp = torch.bfloat16
    with torch.autocast(device_type=device, dtype=amp):
        p = head(pred).sigmoid()
        assert p.dtype == amp
        l1, gl = ops.box_loss(p, target)  # bf16 pred, fp32 target
    assert l1.dtype == torch.float32 and gl.dtype == torch.float32
    (l1.sum() + gl.sum()).backward()
    assert torch.isfinite(head.weight.grad).all()
    # Same values as the op on the same bf16 tensor outside autocast, and as the fp32 reference on its upcast.
    l1b, glb = ops.box_loss(p.detach(), target)
    assert torch.equal(l1, l1b) and torch.equal(gl, glb)
    _close(gl, reference.box_loss(p.detach().float(), target)[1], torch.float32)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_ops_under_torch_compile(device):
    pred, target = box_pairs(_gen(17), 40)
    pred, target = pred.to(device).float(), target.to(device).float()
    compiled = torch.compile(ops.box_loss, backend="aot_eager", fullgraph=True, dynamic=False)
    a = _box_loss_and_grads(compiled, pred, target, 1.0, 2.0)
    b = _box_loss_and_grads(ops.box_loss, pred, target, 1.0, 2.0)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    args = _mc_inputs(device, torch.float32, (2,), 3, 10, 5, 4)
    mc = torch.compile(ops.matching_cost, backend="aot_eager", fullgraph=True, dynamic=False)
    assert torch.equal(mc(*args), ops.matching_cost(*args))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(device, dtype):
    pred, target = box_pairs(_gen(18), 23)
    pred = pred.to(device, dtype).requires_grad_(True)
    target = target.to(device, dtype)
    torch.library.opcheck(torch.ops.detr_fast.box_loss.default, (pred, target))
    torch.library.opcheck(torch.ops.detr_fast.box_loss.default, (pred[:0], target[:0]))
    g = torch.randn(23, 2, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.detr_fast.box_loss_backward.default,
                          (g[:, 0], g[:, 1], pred.detach(), target))
    args = _mc_inputs(device, dtype, (2,), 3, 10, 5, 4)
    torch.library.opcheck(torch.ops.detr_fast.matching_cost.default, (*args, 1.0, 5.0, 2.0))
    empty = _mc_inputs(device, dtype, (), 2, 10, 5, 0)
    torch.library.opcheck(torch.ops.detr_fast.matching_cost.default, (*empty, 1.0, 5.0, 2.0))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_box_loss_bad_inputs(device):
    p = torch.rand(5, 4, device=device)
    bad = [(p[:, :3], p[:, :3]), (p, p[:4]), (p[None], p[None]), (p.long(), p), (p, p.int())]
    for a, b in bad:
        with pytest.raises(ValueError, match="box_loss"):
            ops.box_loss(a, b)
    with pytest.raises(ValueError, match="box_loss_backward"):
        torch.ops.detr_fast.box_loss_backward(torch.ones(4, device=device), torch.ones(5, device=device), p, p)
