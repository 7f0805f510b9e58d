"""detr_fast.ops.relu_dropout: dropout(relu(x)) in one pass, its backward from the output alone. The C++ CPU kernel
here and in CI, the CUDA kernel where a GPU exists (same tests). Output and gradient are compared with the float64
reference given the kernel's own keep mask (cases_attention.compare: fp32/fp64 within 1e-5, fp16/bf16 within twice
the error of the reference computed in that precision)."""
import math

import pytest
import torch
from helpers import cpu_and_cuda, small_cfg

from detr_fast.ops import has_kernel, reference, relu_dropout
from detr_fast.ops.cases_attention import compare
from detr_fast.ops.cases_relu_dropout import references
from detr_fast.ops.layernorm import dropout_mask, relu_dropout_with_state

pytestmark = pytest.mark.skipif(not has_kernel("relu_dropout", "cpu"), reason="detr_fast._C is not built")

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SHAPES = [(1, 1), (4, 7), (3, 33), (17, 128), (5, 3, 256), (0, 256), (2, 1025), (9, 2048)]


def _check(x, go, p, seed=None, offset=0):
    """The op (explicit seed, or the generator) against the reference with the op's own mask: out and dx."""
    leaf = x.detach().clone().requires_grad_(True)
    out, rng = relu_dropout_with_state(leaf, p, seed=seed, offset=offset)
    (dx,) = torch.autograd.grad(out, leaf, go) if out.numel() else (torch.zeros_like(leaf),)
    rows, d = math.prod(x.shape[:-1]), x.shape[-1]
    keep = dropout_mask(rng, rows, d, p)
    r64, rlow = references(x, go, p, keep)
    for i, (name, got) in enumerate((("out", out.detach()), ("dx", dx))):
        assert got.dtype == x.dtype and got.shape == x.shape, name
        err, tol = compare(got, r64[i], rlow[i] if rlow else None, x.dtype)
        assert err <= tol, f"{name}: error {err:.3g} > tolerance {tol:.3g}"
    return out.detach(), rng, keep


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", (0.1, 0.5))
def test_matches_reference(device, dtype, shape, p):
    g = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    x = torch.randn(shape, generator=g).to(device, dtype)
    go = torch.randn(shape, generator=g).to(device, dtype)
    seed = int(torch.randint(0, 1 << 40, (), generator=g))
    _check(x, go, p, seed=seed, offset=int(torch.randint(0, 1000, (), generator=g)))
    torch.manual_seed(seed)  # and from the generator, as in training
    _check(x, go, p)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_eval_and_p0_are_relu(device):
    x = torch.randn(7, 33, device=device)
    for p, training in ((0.3, False), (0.0, True)):
        assert torch.equal(relu_dropout(x, p, training), torch.relu(x))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_generator_draws_reproducible_and_fresh_masks(device):
    x = torch.rand(64, 96, device=device) + 0.5  # positive: the output is zero exactly where dropped
    torch.manual_seed(3)
    a, b = relu_dropout(x, 0.3, True), relu_dropout(x, 0.3, True)
    torch.manual_seed(3)
    a2 = relu_dropout(x, 0.3, True)
    assert torch.equal(a, a2) and not torch.equal(a, b)
    kept = (a != 0).float().mean().item()
    assert abs(kept - 0.7) < 0.03, kept
    torch.testing.assert_close(a[a != 0], (x / 0.7)[a != 0])


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_mask_is_the_layernorm_stream(device):
    """The keep mask equals add_dropout_layernorm's for the same (seed, offset) and [rows, d]."""
    from detr_fast.ops.layernorm import add_dropout_layernorm_with_state

    x = torch.rand(5, 3, 40, device=device) + 0.5
    out, rng = relu_dropout_with_state(x, 0.4, seed=11, offset=7)
    w, b = torch.ones(40, device=device), torch.zeros(40, device=device)
    rng_ln = add_dropout_layernorm_with_state(x, x, w, b, 0.4, 1e-5, seed=11, offset=7)[3]
    assert torch.equal(rng, rng_ln)
    keep = dropout_mask(rng, 15, 40, 0.4)
    assert torch.equal(out.reshape(15, 40) != 0, keep)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_nan_inf_and_zero(device):
    """relu passes NaN and a dropped NaN or inf stays NaN (as torch's relu and dropout); gradients are 0 where the
    output is not positive (dropped, negative, zero, NaN)."""
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 2.0, -3.0, 1.0]] * 64, device=device)
    out, rng = relu_dropout_with_state(x.requires_grad_(True), 0.5, seed=1)
    keep = dropout_mask(rng, 64, 8, 0.5)
    ref = reference.relu_dropout(x.detach(), 0.5, True, dropout_mask=keep)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    fin = ~torch.isnan(ref)
    assert torch.equal(out.detach()[fin], ref[fin])
    (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert torch.equal(dx, torch.where(out.detach() > 0, torch.full_like(dx, 2.0), torch.zeros_like(dx)))
    assert keep.any() and (~keep).any()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_non_contiguous_input(device):
    x = torch.randn(40, 64, device=device)[:, ::2]
    go = torch.randn(40, 32, device=device)
    _check(x, go, 0.25, seed=4)


def test_gradcheck_float64():
    x = torch.randn(6, 13, dtype=torch.float64, requires_grad=True)
    x = x + 0.05 * torch.sign(x).detach()  # away from the kink at 0
    leaf = x.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: relu_dropout_with_state(t, 0.3, seed=9, offset=1)[0], (leaf,))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_opcheck(device):
    x = torch.randn(5, 3, 40, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.detr_fast.relu_dropout.default, (x, 0.25, 77, 3))
    out = torch.ops.detr_fast.relu_dropout(x, 0.25, 77, 3)[0]
    torch.library.opcheck(torch.ops.detr_fast.relu_dropout_backward.default,
                          (torch.randn_like(out), out.detach(), 0.25))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_torch_compile(device):
    x = torch.randn(9, 48, device=device)
    f = torch.compile(lambda t: relu_dropout_with_state(t, 0.2, seed=5)[0], backend="aot_eager", fullgraph=True)
    assert torch.equal(f(x), relu_dropout_with_state(x, 0.2, seed=5)[0])


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_bad_inputs(device):
    x = torch.randn(4, 8, device=device)
    for p in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"p must lie in \[0, 1\)"):
            relu_dropout(x, p, True)
        with pytest.raises(ValueError, match=r"p must lie in \[0, 1\)"):
            relu_dropout_with_state(x, p, seed=1)
    with pytest.raises(ValueError, match="float32"):
        relu_dropout_with_state(x.long(), 0.1, seed=1)
    with pytest.raises(ValueError, match="at least one dimension"):
        relu_dropout_with_state(x[0, 0], 0.1, seed=1)
    with pytest.raises(ValueError, match="shape and dtype"):
        torch.ops.detr_fast.relu_dropout_backward(x[:2], x, 0.1)
    with pytest.raises(ValueError, match="non-negative"):
        relu_dropout_with_state(x, 0.1, seed=-1)


@pytest.mark.needs_cuda
def test_cpu_and_cuda_agree():
    """The same stream on both devices: equal outputs for the same (seed, offset) in fp32."""
    x = torch.randn(33, 130)
    a = relu_dropout_with_state(x, 0.35, seed=123, offset=8)[0]
    b = relu_dropout_with_state(x.cuda(), 0.35, seed=123, offset=8)[0]
    torch.testing.assert_close(b.cpu(), a, rtol=1e-6, atol=0)


def _run(model, images, mask):
    out = model(images, mask)
    loss = out["pred_logits"].square().mean() + out["all_boxes"].sum()
    loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_model_fused_ffn():
    """model.fused_ffn: with dropout 0 (or in eval mode) the same outputs and gradients as the plain FFN, bit for bit,
    and the same state dict; with dropout 0.1 it trains (finite gradients for every FFN weight) and torch.manual_seed
    reproduces its step."""
    from detr_fast.models import build_detr

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(int(torch.randint(0, 1000, ())))
    images = torch.randn(2, 3, 48, 64, generator=g)
    mask = torch.zeros(2, 48, 64, dtype=torch.bool)
    mask[1, :, 40:] = True
    plain = build_detr(small_cfg(**{"model.attention": "fused"}))
    fused = build_detr(small_cfg(**{"model.attention": "fused", "model.fused_ffn": "true"}))
    assert list(plain.state_dict()) == list(fused.state_dict())
    fused.load_state_dict(plain.state_dict())
    (o1, g1), (o2, g2) = _run(plain.train(), images, mask), _run(fused.train(), images, mask)
    assert torch.equal(o1["all_boxes"], o2["all_boxes"]) and g1.keys() == g2.keys()
    assert all(torch.equal(g1[n], g2[n]) for n in g1)

    drop = build_detr(small_cfg(**{"model.attention": "fused", "model.dropout": "0.1", "model.fused_ffn": "true"}))
    drop.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(drop.eval()(images, mask)["all_boxes"], plain.eval()(images, mask)["all_boxes"])
    runs = []
    for _ in range(2):
        drop.zero_grad(set_to_none=True)
        torch.manual_seed(4)
        out, grads = _run(drop.train(), images, mask)
        runs.append((out["all_boxes"].detach(), grads))
    assert torch.equal(runs[0][0], runs[1][0]) and all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])
    ffn = [n for n in runs[0][1] if "linear1" in n or "linear2" in n]
    assert ffn and all(torch.isfinite(runs[0][1][n]).all() for n in ffn)
    assert not torch.equal(runs[0][0], plain.train()(images, mask)["all_boxes"].detach())  # dropout did act


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_registry_cases(device):
    """Every registered validation case (the ones `detr-fast validate` runs) passes, fresh inputs each time."""
    from detr_fast.ops.registry import cases, run_case

    found = [c for c in cases("relu_dropout", device=device) if "bench" not in c.tags]
    assert len(found) >= 8
    seed = int(torch.randint(0, 1 << 30, ()))
    for i, case in enumerate(found):
        for dtype in case.dtypes:
            r = run_case(case, device, dtype, seed + i)
            assert r.passed, (case.name, r)
