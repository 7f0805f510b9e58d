"""model.bias_grad_mm: linear layers whose bias gradient is a matrix product (ones @ grad) compute F.linear's
function and gradients."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from detr_fast.models.linear import BiasGradMM, _LinearBiasGradMM, bias_grad_mm, linear_bias_grad_mm, ones_row

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_step import build, make_batch  # noqa: E402

OVER = ["model.num_classes=7", "model.backbone=resnet18", "model.hidden_dim=64", "model.nheads=2",
        "model.enc_layers=2", "model.dec_layers=3", "model.dim_feedforward=128", "model.num_queries=12",
        "model.dropout=0.0"]


def _inputs(x_shape, n_out, dtype, gen, needs=(True, True, True)):
    n_in = x_shape[-1]
    x = torch.randn(*x_shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(needs[0])
    w = (torch.randn(n_out, n_in, generator=gen, dtype=torch.float64) / n_in ** 0.5).to(dtype).requires_grad_(needs[1])
    b = torch.randn(n_out, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(needs[2])
    return x, w, b


@pytest.mark.parametrize("x_shape,n_out", [((7, 5), 3), ((3, 11, 9), 13), ((2, 1, 4, 6), 1), ((6,), 5),
                                           ((0, 5), 4), ((4, 0, 5), 3)])
def test_gradcheck(x_shape, n_out):
    gen = torch.Generator().manual_seed(sum(x_shape) + n_out)
    x, w, b = _inputs(x_shape, n_out, torch.float64, gen)
    assert torch.autograd.gradcheck(_LinearBiasGradMM.apply, (x, w, b))


@pytest.mark.parametrize("needs", [(True, True, True), (False, True, True), (True, False, True),
                                   (False, False, True)])
def test_equals_f_linear_in_float32(needs):
    """Output bit for bit; each gradient to fp32 summation order (only the requested ones are computed)."""
    gen = torch.Generator().manual_seed(3)
    x, w, b = _inputs((5, 37, 24), 19, torch.float32, gen, needs)
    g = torch.randn(5, 37, 19, generator=gen)
    out = linear_bias_grad_mm(x, w, b)
    ref = F.linear(x, w, b)
    assert torch.equal(out, ref)
    got = torch.autograd.grad(out, [t for t in (x, w, b) if t.requires_grad], g)
    want = torch.autograd.grad(ref, [t for t in (x, w, b) if t.requires_grad], g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_by_the_low_precision_rule():
    """Under bf16 autocast: the output equals autocast's F.linear bit for bit (same casts, same product); each
    gradient's error against float64 is at most twice that of autocast's own F.linear backward."""
    gen = torch.Generator().manual_seed(4)
    x, w, b = _inputs((4, 97, 64), 33, torch.float32, gen)
    g = torch.randn(4, 97, 33, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_bias_grad_mm(x, w, b)
        ref = F.linear(x, w, b)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(out, ref)
    got = torch.autograd.grad(out, (x, w, b), g.bfloat16())
    low = torch.autograd.grad(ref, (x, w, b), g.bfloat16())
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    exact = torch.autograd.grad(F.linear(x64, w64, b64), (x64, w64, b64), g.bfloat16().double())
    for a, lo, e in zip(got, low, exact):
        assert a.dtype == torch.float32  # back through autocast's cast, as F.linear's gradients
        err, err_low = (a.double() - e).abs().max(), (lo.double() - e).abs().max()
        assert err <= 2 * err_low + 1e-6 * e.abs().max(), (err, err_low)


def test_ones_row_grows_and_slices():
    a = ones_row(3, torch.empty(0, dtype=torch.float64))
    assert a.shape == (1, 3) and a.dtype == torch.float64 and bool((a == 1).all())
    big = ones_row(5000, torch.empty(0, dtype=torch.float64))
    assert big.shape == (1, 5000) and bool((big == 1).all())
    assert ones_row(7, torch.empty(0, dtype=torch.float64)).data_ptr() == big.data_ptr()  # the grown buffer, kept


def test_mode_routes_only_linears_whose_bias_needs_a_gradient(monkeypatch):
    calls = []
    real = _LinearBiasGradMM.apply
    monkeypatch.setattr(_LinearBiasGradMM, "apply", lambda *a: calls.append(1) or real(*a))
    lin = torch.nn.Linear(6, 4)
    x = torch.randn(3, 6)
    with BiasGradMM():
        lin(x)
        F.linear(x, lin.weight, bias=lin.bias)
        F.linear(x, lin.weight)  # no bias
        F.linear(x, lin.weight, lin.bias.detach())  # a bias without a gradient
        with torch.no_grad():
            lin(x)
    assert len(calls) == 2
    with bias_grad_mm(False):
        lin(x)
    assert len(calls) == 2


def _model_loss_and_grads(extra, state, batch, dtype=torch.float32, amp=False):
    cfg, model, criterion = build(OVER + list(extra), "fast_fp32", "cpu")
    model.load_state_dict(state, strict=True)
    model.to(dtype)
    images, mask, targets = batch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = model(images.to(dtype), mask)
    losses = criterion(out, targets)
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses)
    total.backward()
    return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("extra", [(), ("model.fused_norm=true", "model.fused_bias_act=true", "model.flat_cast=true",
                                        "model.packed_proj=true", "model.fused_ffn=true")], ids=["plain", "fused_all"])
def test_detr_with_bias_grad_mm_equals_without(extra):
    """The whole model in float64: the same loss and every gradient (the biases' included) to rounding."""
    torch.manual_seed(0)
    _, base, _ = build(OVER, "fast_fp32", "cpu")
    state = base.state_dict()
    batch = make_batch(2, 64, 96, 7, "cpu", seed=21, max_targets=4)
    l0, g0 = _model_loss_and_grads(extra, state, batch, torch.float64)
    l1, g1 = _model_loss_and_grads(list(extra) + ["model.bias_grad_mm=true"], state, batch, torch.float64)
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=0)
    assert g0.keys() == g1.keys()
    assert any(n.endswith("bias") and "transformer" in n for n in g1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-9, atol=1e-12, msg=n)


def test_detr_with_bias_grad_mm_under_bf16_autocast():
    """bf16 autocast (with the one-pass weight cast): the same loss bit for bit, gradients to bf16 rounding."""
    torch.manual_seed(0)
    _, base, _ = build(OVER, "fast_fp32", "cpu")
    state = base.state_dict()
    batch = make_batch(2, 64, 96, 7, "cpu", seed=22, max_targets=4)
    extra = ["model.flat_cast=true", "model.packed_proj=true"]
    l0, g0 = _model_loss_and_grads(extra, state, batch, amp=True)
    l1, g1 = _model_loss_and_grads(extra + ["model.bias_grad_mm=true"], state, batch, amp=True)
    assert torch.equal(l1, l0)
    for n in g0:
        scale = g0[n].abs().max().clamp_min(1e-6)
        assert ((g1[n] - g0[n]).abs().max() / scale) < 2e-2, n


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_by_the_rule(dtype):
    """On a GPU, in the step's shapes (encoder rows 8 x 1,050 and odd sizes): each gradient's error against float64 at
    most twice that of F.linear's own backward in the same dtype (the ones-row product's accumulation included)."""
    gen = torch.Generator().manual_seed(5)
    for x_shape, n_out in [((1050, 8, 256), 2048), ((97, 3, 33), 65), ((100, 8, 256), 256)]:
        x, w, b = (t.detach().cuda().to(dtype).requires_grad_() for t in _inputs(x_shape, n_out, torch.float32, gen))
        g = torch.randn(*x_shape[:-1], n_out, generator=gen).cuda().to(dtype)
        out = linear_bias_grad_mm(x, w, b)
        ref = F.linear(x, w, b)
        got = torch.autograd.grad(out, (x, w, b), g)
        low = torch.autograd.grad(ref, (x, w, b), g)
        x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
        exact = torch.autograd.grad(F.linear(x64, w64, b64), (x64, w64, b64), g.double())
        for name, a, lo, e in zip("xwb", got, low, exact):
            err, err_low = (a.double() - e).abs().max(), (lo.double() - e).abs().max()
            assert err <= 2 * err_low + 1e-6 * e.abs().max(), (x_shape, name, err, err_low)
