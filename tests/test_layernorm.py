"""detr_fast.ops.add_dropout_layernorm: the C++ CPU kernel here and in CI, the CUDA kernel where a GPU exists (same
tests).

Output and the gradients of x, residual, weight and bias are compared with the float64 reference given the
kernel's own dropout mask, by the rule of cases_attention.compare (fp32/fp64 within 1e-5; fp16/bf16 within twice
the error of the reference computed in that precision).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import OpCounter, assert_layernorm_stats, cpu_and_cuda, philox4x32_10, small_cfg

from detr_fast.models import build_detr
from detr_fast.ops import add_dropout_layernorm, has_kernel, reference
from detr_fast.ops.cases_attention import LOW_PRECISION, compare
from detr_fast.ops.cases_layernorm import make_inputs
from detr_fast.ops.layernorm import add_dropout_layernorm_with_state, dropout_mask
from detr_fast.ops.registry import cases, run_case

pytestmark = pytest.mark.skipif(not has_kernel("add_dropout_layernorm", "cpu"), reason="detr_fast._C is not built")

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
NAMES = ("out", "dx", "dresidual", "dweight", "dbias")


def _grads(fn, tensors, go):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, go)]


def _check(x, residual, weight, bias, go, p=0.0, seed=None, offset=0, eps=1e-5):
    """Run the kernel op (explicit seed, or the generator when seed is None and p > 0), compare output and the four
    gradients with the reference given the kernel's own mask. Returns (out, mean, rstd, rng_state, keep)."""
    state = {}

    def ours(*t):
        out, mean, rstd, rng = add_dropout_layernorm_with_state(*t, p, eps, seed=seed, offset=offset)
        state.update(mean=mean, rstd=rstd, rng=rng)
        return out

    dtype = x.dtype
    got = _grads(ours, (x, residual, weight, bias), go)
    rows, d = math.prod(x.shape[:-1]), x.shape[-1]
    keep = dropout_mask(state["rng"], rows, d, p) if p > 0 else None
    training = keep is not None
    ref64 = _grads(lambda *t: reference.add_dropout_layernorm(*t, p, training, eps, dropout_mask=keep),
                   (x.double(), residual.double(), weight.double(), bias.double()), go.double())
    ref_low = None
    if dtype in LOW_PRECISION:
        ref_low = _grads(lambda *t: reference.add_dropout_layernorm(*t, p, training, eps, dropout_mask=keep),
                         (x, residual, weight.to(dtype), bias.to(dtype)), go)
    for i, name in enumerate(NAMES):
        want_dtype = dtype if i < 3 else weight.dtype
        assert got[i].dtype == want_dtype and got[i].shape == ref64[i].shape, name
        err, tol = compare(got[i], ref64[i], ref_low[i] if ref_low else None, dtype)
        assert err <= tol, f"{name}: error {err:.3g} > tolerance {tol:.3g}"
    return got[0], state["mean"], state["rstd"], state["rng"], keep


# d around the CUDA kernel's configurations: a warp per row with 1, 2, 4, 8 vectors per lane up to d = 1024
# (1024 the last), a 256-thread block per row above (1025 the first), with and without d % 4 == 0.
SHAPES = [(1, 1), (4, 7), (3, 33), (17, 128), (5, 3, 256), (9, 1000), (0, 256), (2, 1024), (2, 1025), (3, 1536),
          (2, 4100)]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", (0.0, 0.2))
def test_matches_reference(device, dtype, shape, p):
    gen = torch.Generator().manual_seed(hash((shape, p)) % 2**31)
    x, residual, weight, bias = make_inputs(shape, device, dtype, gen)
    go = torch.randn(shape, generator=gen).to(device, dtype)
    out, mean, rstd, rng, _ = _check(x, residual, weight, bias, go, p=p, seed=1234 if p else None, offset=8)
    assert rng.tolist() == ([1234, 8] if p else [0, 0])
    if p == 0:
        assert_layernorm_stats(x, residual, mean, rstd)
    else:
        assert mean.shape == rstd.shape == (math.prod(shape[:-1]),)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("p", (0.0, 0.1))
def test_float32_parameters_with_low_precision_inputs(device, dtype, p):
    """LayerNorm parameters stay fp32 under autocast: out in x's dtype, d weight / d bias in fp32."""
    gen = torch.Generator().manual_seed(2)
    x, residual, weight, bias = make_inputs((37, 256), device, dtype, gen, param_dtype=torch.float32)
    go = torch.randn(37, 256, generator=gen).to(device, dtype)
    _check(x, residual, weight, bias, go, p=p, seed=99 if p else None)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_eval_and_p0_are_layer_norm(device):
    """training False (any p) or p == 0: F.layer_norm(residual + x) with the fp32 kernel's default tolerances."""
    gen = torch.Generator().manual_seed(3)
    x, residual, weight, bias = make_inputs((2, 45, 256), device, torch.float32, gen)
    want = F.layer_norm(residual + x, (256,), weight, bias, 1e-5)
    torch.testing.assert_close(add_dropout_layernorm(x, residual, weight, bias, 0.5, False), want)
    torch.testing.assert_close(add_dropout_layernorm(x, residual, weight, bias, 0.0, True), want)
    want = F.layer_norm(residual + x, (256,), weight, bias, 1e-3)
    torch.testing.assert_close(add_dropout_layernorm(x, residual, weight, bias, 0.0, True, eps=1e-3), want)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_non_contiguous_inputs(device):
    """x as a transposed view, residual as a strided slice, weight and bias as strided views."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(128, 6, generator=gen).to(device).t()  # [6, 128], stride (1, 6)
    residual = torch.randn(6, 256, generator=gen).to(device)[:, ::2]  # [6, 128]
    wb = torch.randn(128, 2, generator=gen).to(device)
    weight, bias = 1.0 + 0.1 * wb[:, 0], wb[:, 1]  # bias has stride 2
    assert not x.is_contiguous() and not residual.is_contiguous() and not bias.is_contiguous()
    go = torch.randn(128, 6, generator=gen).to(device).t()
    _check(x, residual, weight, bias, go)
    _check(x, residual, weight, bias, go, p=0.25, seed=5, offset=12)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_unaligned_inputs(device, dtype):
    """Contiguous inputs whose base is not 16-byte aligned (storage offset 1): the kernels' scalar-load path."""
    gen = torch.Generator().manual_seed(15)
    rows, d = 7, 256
    x = torch.randn(rows * d + 1, generator=gen).to(device, dtype)[1:].view(rows, d)
    residual = torch.randn(rows * d + 3, generator=gen).to(device, dtype)[3:].view(rows, d)
    _, _, weight, bias = make_inputs((rows, d), device, dtype, gen)
    go = torch.randn(rows * d + 1, generator=gen).to(device, dtype)[1:].view(rows, d)
    assert x.is_contiguous() and x.storage_offset() == 1
    _check(x, residual, weight, bias, go, p=0.2, seed=3)


@pytest.mark.needs_cuda
def test_cuda_large_d_falls_back_to_reference():
    """d above the CUDA kernel's limit: the op runs the reference with a warning; the kernel op itself refuses."""
    import warnings

    from detr_fast.ops.layernorm import CUDA_MAX_D

    gen = torch.Generator().manual_seed(16)
    x, residual, weight, bias = make_inputs((3, CUDA_MAX_D + 1), "cuda", torch.float32, gen)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = add_dropout_layernorm(x, residual, weight, bias, 0.1, False)
    assert any("reference" in str(m.message) for m in w)
    torch.testing.assert_close(out, F.layer_norm(residual + x, (CUDA_MAX_D + 1,), weight, bias))
    with pytest.raises(ValueError, match="at most"):
        add_dropout_layernorm_with_state(x, residual, weight, bias)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_dropout_from_generator_backward_uses_forward_mask(device):
    """Dropout drawn from torch's generator: output and grads equal the reference given the mask the op used."""
    gen = torch.Generator().manual_seed(6)
    x, residual, weight, bias = make_inputs((3, 70, 96), device, torch.float32, gen)
    go = torch.randn(3, 70, 96, generator=gen).to(device)
    _, _, _, rng, keep = _check(x, residual, weight, bias, go, p=0.3)
    assert rng.device == x.device and rng.dtype == torch.int64 and rng[0].item() >= 0
    assert 0 < keep.sum() < keep.numel()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_dropout_reproducible_under_manual_seed(device):
    gen = torch.Generator().manual_seed(7)
    x, residual, weight, bias = make_inputs((33, 64), device, torch.float32, gen)

    def two_calls():
        return [add_dropout_layernorm(x, residual, weight, bias, 0.3, True) for _ in range(2)]

    torch.manual_seed(123)
    a1, a2 = two_calls()
    torch.manual_seed(123)
    b1, b2 = two_calls()
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)  # successive calls draw different masks


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("p", (0.1, 0.5))
def test_dropout_kept_fraction(device, p):
    """Kept fraction of a 1M-element mask, overall and for each of the four words of a Philox block, within
    6 binomial standard deviations of 1 - p (fixed seeds: deterministic)."""
    rows, d = 1000, 1000
    for seed, offset in ((0, 0), (2**40 + 17, 1 << 33)):
        keep = dropout_mask(torch.tensor([seed, offset], device=device), rows, d, p).cpu()
        assert keep.shape == (rows, d) and keep.dtype == torch.bool
        for part in (keep, *(keep[:, w::4] for w in range(4))):
            n = part.numel()
            frac = part.double().mean().item()
            assert abs(frac - (1 - p)) <= 6 * math.sqrt(p * (1 - p) / n), (seed, frac)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_mask_reproducible_and_distinct(device):
    def mask(seed, offset, rows=64, d=100):
        return dropout_mask(torch.tensor([seed, offset], device=device), rows, d, 0.4)

    assert torch.equal(mask(11, 4), mask(11, 4))
    assert not torch.equal(mask(11, 4), mask(12, 4))
    assert not torch.equal(mask(11, 4), mask(11, 8))
    # the offset shifts the rows of the stream: row r of offset o + 4 is row r + 4 of offset o
    assert torch.equal(mask(11, 8)[:60], mask(11, 4)[4:])
    # the same (seed, offset) for a different d keeps the first columns
    assert torch.equal(mask(11, 4, d=37), mask(11, 4, d=100)[:, :37])


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_mask_follows_documented_stream(device):
    """add_dropout_layernorm_mask equals the stream documented in layernorm_math.h, computed here in Python."""
    rows, d, p = 5, 11, 0.3
    seed, offset = 0x1234_5678_9ABC, (1 << 32) - 2  # offset + row crosses a 32-bit boundary
    keep = dropout_mask(torch.tensor([seed, offset], device=device), rows, d, p).cpu()
    thr = int(p * 2**32)
    for row in range(rows):
        sub = offset + row
        for col in range(d):
            words = philox4x32_10((col >> 2, 0x80004C4E, sub & 0xFFFFFFFF, sub >> 32),
                                   (seed & 0xFFFFFFFF, seed >> 32))
            assert bool(keep[row, col]) == (words[col & 3] >= thr), (row, col)


@pytest.mark.needs_cuda
def test_cpu_and_cuda_agree():
    gen = torch.Generator().manual_seed(8)
    x, residual, weight, bias = make_inputs((65, 256), "cpu", torch.float32, gen)
    rng = torch.tensor([987654321, 12])
    assert torch.equal(dropout_mask(rng, 65, 256, 0.25), dropout_mask(rng.cuda(), 65, 256, 0.25).cpu())
    out_cpu = add_dropout_layernorm_with_state(x, residual, weight, bias, 0.25, seed=987654321, offset=12)[0]
    out_gpu = add_dropout_layernorm_with_state(x.cuda(), residual.cuda(), weight.cuda(), bias.cuda(), 0.25,
                                               seed=987654321, offset=12)[0]
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", (0.0, 0.3))
def test_gradcheck_float64(p):
    """float64 gradcheck of all four inputs; with p > 0 a fixed (seed, offset) gives the same mask every call."""
    gen = torch.Generator().manual_seed(9)
    for shape in ((3, 7), (2, 2, 5)):
        leaves = [t.requires_grad_(True) for t in make_inputs(shape, "cpu", torch.float64, gen)]

        def fn(*t):
            return add_dropout_layernorm_with_state(*t, p, 1e-5, seed=42 if p else None, offset=4)[0]

        assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_opcheck(device):
    gen = torch.Generator().manual_seed(10)
    x, residual, weight, bias = make_inputs((5, 3, 40), device, torch.float32, gen)
    leaves = [t.requires_grad_(True) for t in (x, residual, weight, bias)]
    for p, seed in ((0.0, None), (0.25, 77)):
        torch.library.opcheck(torch.ops.detr_fast.add_dropout_layernorm.default, (*leaves, p, 1e-5, seed, 3))
    out, mean, rstd, rng = torch.ops.detr_fast.add_dropout_layernorm(*leaves, 0.25, 1e-5, 77, 3)
    torch.library.opcheck(torch.ops.detr_fast.add_dropout_layernorm_backward.default,
                          (torch.randn_like(out), x.detach(), residual.detach(), weight.detach(), mean, rstd, 0.25,
                           rng))
    torch.library.opcheck(torch.ops.detr_fast.add_dropout_layernorm_mask.default, (rng, 15, 40, 0.25))
    # the mixed case: a bf16 x with the fp32 residual (fake outputs in the residual's dtype, x's gradient in x's)
    xb = x.detach().bfloat16().requires_grad_(True)
    torch.library.opcheck(torch.ops.detr_fast.add_dropout_layernorm.default,
                          (xb, residual, weight, bias, 0.25, 1e-5, 77, 3))
    out, mean, rstd, rng = torch.ops.detr_fast.add_dropout_layernorm(xb, residual, weight, bias, 0.25, 1e-5, 77, 3)
    assert out.dtype == torch.float32
    torch.library.opcheck(torch.ops.detr_fast.add_dropout_layernorm_backward.default,
                          (torch.randn_like(out), xb.detach(), residual.detach(), weight.detach(), mean, rstd, 0.25,
                           rng))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_torch_compile(device):
    gen = torch.Generator().manual_seed(11)
    t = make_inputs((9, 64), device, torch.float32, gen)
    go = torch.randn(9, 64, generator=gen).to(device)
    compiled = torch.compile(add_dropout_layernorm, backend="aot_eager", fullgraph=True)
    got = _grads(lambda *a: compiled(*a, 0.0, False), t, go)
    want = _grads(lambda *a: add_dropout_layernorm(*a, 0.0, False), t, go)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_empty_rows(device):
    gen = torch.Generator().manual_seed(12)
    leaves = [t.requires_grad_(True) for t in make_inputs((0, 3, 32), device, torch.float32, gen)]
    out = add_dropout_layernorm(*leaves, 0.1, True)
    assert out.shape == (0, 3, 32)
    out.sum().backward()
    for t in leaves:
        assert t.grad is not None and t.grad.shape == t.shape and (t.grad == 0).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_bad_inputs(device):
    gen = torch.Generator().manual_seed(13)
    x, residual, weight, bias = make_inputs((4, 16), device, torch.float32, gen)
    with pytest.raises(ValueError, match="same shape"):
        add_dropout_layernorm(x, residual[:, :8], weight, bias)
    with pytest.raises(ValueError, match=r"shape \[d\] = \[16\]"):
        add_dropout_layernorm(x, residual, weight[:8], bias)
    with pytest.raises(ValueError, match=r"shape \[d\] = \[16\]"):
        add_dropout_layernorm(x, residual, weight, bias[None])
    for p in (1.0, -0.1, 1.5):
        for training in (True, False):
            with pytest.raises(ValueError, match=r"p must lie in \[0, 1\)"):
                add_dropout_layernorm(x, residual, weight, bias, p, training)
    with pytest.raises(ValueError, match="share one dtype"):
        add_dropout_layernorm(x, residual.double(), weight, bias)
    with pytest.raises(ValueError, match="share one dtype"):  # mixed only as a low-precision x, fp32 residual
        add_dropout_layernorm(x, residual.bfloat16(), weight, bias)
    with pytest.raises(ValueError, match="share one dtype"):
        add_dropout_layernorm(x.bfloat16(), residual.half(), weight, bias)
    with pytest.raises(ValueError, match="residual's"):
        torch.ops.detr_fast.add_dropout_layernorm_backward(x.bfloat16(), x.bfloat16(), residual, weight,
                                                           residual[:, 0], residual[:, 0], 0.0,
                                                           torch.zeros(2, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="float32"):
        add_dropout_layernorm(x, residual, weight.double(), bias.double())
    with pytest.raises(ValueError, match="d >= 1"):
        add_dropout_layernorm(x[:, :0], residual[:, :0], weight[:0], bias[:0])
    with pytest.raises(ValueError, match="floating-point"):
        add_dropout_layernorm(x.long(), residual.long(), weight, bias)
    with pytest.raises(ValueError, match="non-negative"):
        add_dropout_layernorm_with_state(x, residual, weight, bias, 0.1, seed=-1)


def test_autocast_cpu():
    """Under autocast, bf16 x with an fp32 residual gives what the plain path gives: layer_norm in fp32; x goes to
    the kernel as it is (no cast operator), a bf16 residual is cast to fp32."""
    gen = torch.Generator().manual_seed(14)
    x, residual, weight, bias = make_inputs((6, 64), "cpu", torch.float32, gen)
    xb = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with OpCounter() as c:
            got = add_dropout_layernorm(xb, residual, weight, bias, 0.1, False)
        assert c.ops["aten._to_copy"] == 0 and c.ops["detr_fast.add_dropout_layernorm"] == 1
        want = F.layer_norm(residual + xb, (64,), weight, bias)
        both_low = add_dropout_layernorm(xb, residual.bfloat16(), weight, bias, 0.1, False)
        # both low: the sum in fp32 (the plain path would round it to bf16 first)
        want_low = F.layer_norm(residual.bfloat16().float() + xb.float(), (64,), weight, bias)
    assert got.dtype == want.dtype == both_low.dtype == torch.float32
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(both_low, want_low)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("xdtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (4, 7), (3, 33), (17, 128), (5, 3, 256), (0, 256), (2, 1024), (2, 1025),
                                   (3, 1536)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", (0.0, 0.2))
def test_mixed_low_precision_x_with_float32_residual(device, xdtype, shape, p):
    """x fp16/bf16 with an fp32 residual (autocast's residual stream): out and the residual's gradient fp32, x's
    gradient in x's dtype. Bit for bit what casting x to fp32 first gives (the same values reach the same math; x's
    gradient rounded once), and within the fp32 rule of the fp64 reference given the kernel's own mask."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    x, residual, weight, bias = make_inputs(shape, device, torch.float32, gen)
    x = x.to(xdtype)
    go = torch.randn(shape, generator=gen).to(device)
    seed = int(torch.randint(0, 1 << 40, (), generator=gen))

    def op(*t):
        return add_dropout_layernorm_with_state(*t, p, 1e-5, seed=seed, offset=3)[0]

    mixed = _grads(op, (x, residual, weight, bias), go)
    upcast = _grads(op, (x.float(), residual, weight, bias), go)
    assert [t.dtype for t in mixed] == [torch.float32, xdtype, torch.float32, torch.float32, torch.float32]
    for i, name in enumerate(NAMES):
        want = upcast[i].to(xdtype) if name == "dx" else upcast[i]
        assert torch.equal(mixed[i], want), name
    rows, d = math.prod(shape[:-1]), shape[-1]
    keep = None
    if p > 0:
        rng = add_dropout_layernorm_with_state(x, residual, weight, bias, p, 1e-5, seed=seed, offset=3)[3]
        keep = dropout_mask(rng, rows, d, p)
    ref64 = _grads(lambda *t: reference.add_dropout_layernorm(*t, p, p > 0, 1e-5, dropout_mask=keep),
                   (x.double(), residual.double(), weight.double(), bias.double()), go.double())
    for i, name in enumerate(NAMES):
        if name == "dx":  # one rounding to x's dtype on top of the fp32 rule
            scale = max(ref64[i].abs().max().item(), 1.0) if ref64[i].numel() else 1.0
            ulp = 2.0 ** -8 if xdtype == torch.bfloat16 else 2.0 ** -11
            if ref64[i].numel():
                assert (mixed[i].double() - ref64[i]).abs().max().item() <= ulp * scale + 1e-5 * scale, name
        else:
            err, tol = compare(mixed[i], ref64[i], None, torch.float32)
            assert err <= tol, f"{name}: error {err:.3g} > tolerance {tol:.3g}"
    # the reference takes the mixed case too (x promoted first): the same values
    ref_mixed = reference.add_dropout_layernorm(x, residual, weight, bias, p, p > 0, 1e-5, dropout_mask=keep)
    assert ref_mixed.dtype == torch.float32
    torch.testing.assert_close(ref_mixed, mixed[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_registry_cases(device):
    for i, case in enumerate(cases(op="add_dropout_layernorm", device=device)):
        if "bench" in case.tags:
            continue
        for dtype in case.dtypes:
            r = run_case(case, device, dtype, seed=200 + i)
            assert r.passed, r


def _model_run(model, images, mask):
    model.train()
    out = model(images, mask)
    loss = out["pred_logits"].square().mean() + out["pred_boxes"].sum() + sum(
        a["pred_boxes"].mean() for a in out["aux_outputs"])
    loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_model_fused_norm_matches_plain(dtype):
    """model.fused_norm true vs false on the same weights (dropout 0, train mode): the same state-dict keys, outputs
    and gradients (fp32: within 1e-5 relative; fp64: within 1e-9 relative)."""
    torch.manual_seed(0)
    plain = build_detr(small_cfg()).to(dtype)
    fused = build_detr(small_cfg(**{"model.fused_norm": "true"})).to(dtype)
    assert list(plain.state_dict()) == list(fused.state_dict())
    fused.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 48, 64, generator=g).to(dtype)
    mask = torch.zeros(2, 48, 64, dtype=torch.bool)
    mask[1, 30:] = True
    (o1, g1), (o2, g2) = _model_run(plain, images, mask), _model_run(fused, images, mask)
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-9, 1e-12)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(o2[key], o1[key], rtol=rtol, atol=atol)
    assert g1.keys() == g2.keys() and any("norm" in n for n in g1)
    for n in g1:
        if dtype == torch.float64:
            torch.testing.assert_close(g2[n], g1[n], rtol=rtol, atol=atol, msg=lambda m, n=n: f"{n}: {m}")
        else:  # fp32: every gradient within 1e-5 of the tensor's largest gradient (rounding through 5 layers)
            err = (g2[n] - g1[n]).abs().max().item()
            assert err <= 1e-5 * g1[n].abs().max().item(), (n, err)


def test_model_fused_norm_with_dropout():
    """dropout 0.1: in eval mode fused and plain agree; in train mode the fused model trains (finite loss and
    gradients, every LayerNorm parameter gets a gradient) and torch.manual_seed reproduces its step."""
    torch.manual_seed(0)
    plain = build_detr(small_cfg(**{"model.dropout": "0.1"}))
    fused = build_detr(small_cfg(**{"model.dropout": "0.1", "model.fused_norm": "true"}))
    fused.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 48, 64, generator=g)
    mask = torch.zeros(2, 48, 64, dtype=torch.bool)
    with torch.no_grad():
        o1, o2 = plain.eval()(images, mask), fused.eval()(images, mask)
    torch.testing.assert_close(o2["pred_boxes"], o1["pred_boxes"], rtol=1e-5, atol=1e-6)
    runs = []
    for _ in range(2):
        fused.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        out, grads = _model_run(fused, images, mask)
        runs.append((out["pred_boxes"].detach(), grads))
    (b1, g1), (b2, g2) = runs
    assert torch.isfinite(b1).all() and torch.equal(b1, b2)
    norm_params = [n for n, _ in fused.named_parameters() if ".norm" in n and "layers" in n]
    assert norm_params and all(n in g1 and torch.isfinite(g1[n]).all() for n in norm_params)
    assert all(torch.equal(g1[n], g2[n]) for n in g1)
