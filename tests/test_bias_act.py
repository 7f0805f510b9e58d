"""detr_fast.ops.bias_act: the C++ CPU kernel here and in CI, the CUDA kernel where a GPU exists (same tests).

Output and the gradients of x, bias and residual are compared with the float64 reference by the rule of
cases_attention.compare (fp32/fp64 within 1e-5; fp16/bf16 within twice the error of the reference computed in that
precision), on fresh random inputs of odd sizes in both layouts.
"""
import pytest
import torch
from helpers import cpu_and_cuda

from detr_fast.ops import bias_act, has_kernel, reference
from detr_fast.ops.cases_attention import LOW_PRECISION, compare
from detr_fast.ops.cases_bias_act import make_inputs, same_layout
from detr_fast.ops.registry import cases, run_case

pytestmark = pytest.mark.skipif(not has_kernel("bias_act", "cpu"), reason="detr_fast._C is not built")

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
NAMES = ("out", "dx", "dbias", "dresidual")


def _grads(fn, x, bias, residual, go):
    """(out, d x, d bias, d residual) of fn with every tensor input a leaf; d residual None without residual."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, bias)]
    r = residual.detach().clone().requires_grad_(True) if residual is not None else None
    out = fn(*leaves, r)
    grads = torch.autograd.grad(out, leaves + ([r] if r is not None else []), go)
    return [out.detach(), *grads] + ([None] if r is None else [])


def _check(x, bias, residual, go, relu=True):
    """Compare output and gradients of the op with the fp64 reference (and the low-precision one)."""
    dtype = x.dtype
    got = _grads(lambda a, b, r: bias_act(a, b, r, relu), x, bias, residual, go)
    r64 = residual.double() if residual is not None else None
    ref64 = _grads(lambda a, b, r: reference.bias_act(a, b, r, relu), x.double(), bias.double(), r64, go.double())
    ref_low = None
    if dtype in LOW_PRECISION:
        ref_low = _grads(lambda a, b, r: reference.bias_act(a, b, r, relu), x, bias, residual, go)
    assert same_layout(got[0], x), "output layout"
    for i, name in enumerate(NAMES):
        if got[i] is None:
            continue
        want_dtype = bias.dtype if name == "dbias" else dtype
        assert got[i].dtype == want_dtype and got[i].shape == ref64[i].shape, name
        err, tol = compare(got[i].to(dtype) if name == "dbias" else got[i], ref64[i],
                           ref_low[i] if ref_low else None, dtype)
        assert err <= tol, f"{name}: error {err:.3g} > tolerance {tol:.3g}"
    return got


# Odd sizes; channels_last with C a multiple of every vector width (8, 16, 64) and not (3, 5); inner sizes with and
# without a multiple of the vector width; 2-D and 3-D inputs; empty batches and maps.
SHAPES = [((2, 3, 5, 7), False), ((2, 3, 5, 7), True), ((3, 16, 9, 11), True), ((2, 64, 13, 6), True),
          ((2, 8, 4, 4), False), ((1, 5, 1, 1), True), ((4, 37), False), ((2, 8, 33), False), ((0, 16, 4, 4), True),
          ((2, 16, 0, 5), False), ((3, 0, 2, 2), False)]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,cl", SHAPES, ids=lambda s: "x".join(map(str, s)) if isinstance(s, tuple) else
                         ("cl" if s else "nchw"))
@pytest.mark.parametrize("residual", (True, False), ids=("res", "nores"))
@pytest.mark.parametrize("relu", (True, False), ids=("relu", "norelu"))
def test_matches_reference(device, dtype, shape, cl, residual, relu):
    gen = torch.Generator().manual_seed(hash((shape, cl, residual, relu)) % 2**31)
    x, bias, r = make_inputs(shape, device, dtype, gen, residual=residual, channels_last=cl)
    go = torch.randn(shape, generator=gen).to(device, dtype)
    _check(x, bias, r, go, relu)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("cl", (True, False), ids=("cl", "nchw"))
def test_float32_bias_with_low_precision_x(device, dtype, cl):
    """As under autocast: bf16/fp16 activations, the folded shift in float32; d bias comes back in float32."""
    gen = torch.Generator().manual_seed(3)
    x, bias, r = make_inputs((3, 24, 7, 9), device, dtype, gen, bias_fp32=True, channels_last=cl)
    go = torch.randn(3, 24, 7, 9, generator=gen).to(device, dtype)
    got = _check(x, bias, r, go)
    assert got[2].dtype == torch.float32


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_rounds_once(device):
    """The sum is formed in float32 and rounded once: equal to the float32 result rounded to bf16."""
    gen = torch.Generator().manual_seed(4)
    x, bias, r = make_inputs((2, 16, 6, 5), device, torch.bfloat16, gen, bias_fp32=True, channels_last=True)
    want = (x.float() + bias[:, None, None] + r.float()).relu().bfloat16()
    assert torch.equal(bias_act(x, bias, r), want)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_residual_layout_differs_from_x(device):
    """A contiguous residual with a channels_last x (and the reverse) is read in its own layout."""
    gen = torch.Generator().manual_seed(5)
    for x_cl in (True, False):
        x, bias, r = make_inputs((2, 16, 5, 3), device, torch.float32, gen, channels_last=x_cl)
        r_other = r.contiguous(memory_format=torch.contiguous_format if x_cl else torch.channels_last)
        go = torch.randn(2, 16, 5, 3, generator=gen).to(device)
        _check(x, bias, r_other, go)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_non_contiguous_and_unaligned(device, dtype):
    """Strided views (a transposed map, a sliced batch, a strided bias) and a storage offset that breaks 16-byte
    alignment: the scalar path, and the layout normalization."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 16, 7, 5, generator=gen).to(device, dtype).transpose(2, 3)  # [2, 16, 5, 7], neither layout
    r = torch.randn(4, 16, 5, 7, generator=gen).to(device, dtype)[::2]
    bias = torch.randn(32, generator=gen).to(device, dtype)[::2]
    go = torch.randn(2, 16, 5, 7, generator=gen).to(device, dtype)
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    _check(x, bias, r, go)
    n = 2 * 16 * 5 * 7
    xu = torch.randn(n + 1, generator=gen).to(device, dtype)[1:].view(2, 16, 5, 7)
    ru = torch.randn(n + 3, generator=gen).to(device, dtype)[3:].view(2, 16, 5, 7)
    assert xu.storage_offset() == 1
    _check(xu, bias.contiguous(), ru, go)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_nan_and_inf_propagate(device):
    """NaN stays NaN through the ReLU (as torch.relu); +inf stays, -inf becomes 0; the gradient is what torch's ReLU
    backward gives (0 where out <= 0; passed through where out is NaN)."""
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 1.0, -1.0]], device=device).view(1, 5, 1)
    bias = torch.zeros(5, device=device)
    got = bias_act(x, bias)
    want = torch.relu(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got[~torch.isnan(got)], want[~torch.isnan(want)])
    leaf, plain = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    bias_act(leaf, bias).backward(torch.ones_like(x))
    torch.relu(plain).backward(torch.ones_like(x))
    assert torch.equal(leaf.grad, plain.grad) and leaf.grad.view(-1).tolist()[1:] == [1.0, 0.0, 1.0, 0.0]


def test_gradcheck_float64():
    """float64 gradcheck of x, bias and residual (values kept away from the ReLU's kink), both layouts."""
    gen = torch.Generator().manual_seed(7)
    for shape, cl, residual, relu in (((2, 3, 4, 5), False, True, True), ((2, 8, 3, 3), True, True, True),
                                      ((3, 6), False, False, True), ((2, 4, 5), False, True, False)):
        x, bias, r = make_inputs(shape, "cpu", torch.float64, gen, residual=residual, channels_last=cl)
        x = x + torch.where(x + bias.view([1, -1] + [1] * (x.dim() - 2)) + (r if r is not None else 0) > 0,
                            0.05, -0.05)  # no sum within 0.05 of 0: finite differences stay on one side
        leaves = [x.requires_grad_(True), bias.requires_grad_(True)] + ([r.requires_grad_(True)] if residual else [])
        fn = (lambda a, b, c: bias_act(a, b, c, relu)) if residual else (lambda a, b: bias_act(a, b, None, relu))
        assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_frozen_bias_needs_no_sum(device):
    """With a bias that does not require grad (the folded shift of a frozen BatchNorm), only x and residual get
    gradients, and they equal the reference's."""
    gen = torch.Generator().manual_seed(8)
    x, bias, r = make_inputs((2, 8, 5, 5), device, torch.float32, gen, channels_last=True)
    xl, rl = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
    out = bias_act(xl, bias, rl)
    go = torch.randn_like(out)
    gx, gr = torch.autograd.grad(out, (xl, rl), go)
    want = torch.where(reference.bias_act(x, bias, r) > 0, go, 0.0)
    assert torch.equal(gx, want) and torch.equal(gr, want)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_opcheck(device):
    gen = torch.Generator().manual_seed(9)
    for cl, residual, relu in ((False, True, True), (True, True, False), (True, False, True)):
        x, bias, r = make_inputs((2, 8, 5, 3), device, torch.float32, gen, residual=residual, channels_last=cl)
        args = (x.requires_grad_(True), bias.requires_grad_(True),
                r.requires_grad_(True) if r is not None else None, relu)
        torch.library.opcheck(torch.ops.detr_fast.bias_act.default, args)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_torch_compile(device):
    gen = torch.Generator().manual_seed(10)
    x, bias, r = make_inputs((2, 8, 5, 3), device, torch.float32, gen, channels_last=True)
    go = torch.randn(2, 8, 5, 3, generator=gen).to(device)
    compiled = torch.compile(bias_act, backend="aot_eager", fullgraph=True)
    got = _grads(lambda a, b, c: compiled(a, b, c), x, bias, r, go)
    want = _grads(lambda a, b, c: bias_act(a, b, c), x, bias, r, go)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_empty_inputs_backprop(device):
    gen = torch.Generator().manual_seed(11)
    x, bias, r = make_inputs((0, 16, 4, 4), device, torch.float32, gen, channels_last=True)
    leaves = [t.requires_grad_(True) for t in (x, bias, r)]
    out = bias_act(*leaves)
    assert out.shape == (0, 16, 4, 4)
    out.sum().backward()
    for t in leaves:
        assert t.grad is not None and t.grad.shape == t.shape and (t.grad == 0).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_bad_inputs(device):
    gen = torch.Generator().manual_seed(12)
    x, bias, r = make_inputs((2, 8, 3, 3), device, torch.float32, gen)
    with pytest.raises(ValueError, match=r"shape \[N, C, \.\.\.\]"):
        bias_act(x[0, 0, 0], bias)
    with pytest.raises(ValueError, match=r"bias must have shape \[C\] = \[8\]"):
        bias_act(x, bias[:5])
    with pytest.raises(ValueError, match=r"bias must have shape \[C\] = \[8\]"):
        bias_act(x, bias[None])
    with pytest.raises(ValueError, match="residual must have x's shape"):
        bias_act(x, bias, r[:1])
    with pytest.raises(ValueError, match="residual must have x's dtype"):
        bias_act(x, bias, r.double())
    with pytest.raises(ValueError, match="float32"):
        bias_act(x, bias.double())
    with pytest.raises(ValueError, match="float32, float64, float16 or bfloat16"):
        bias_act(x.long(), bias)
    if device == "cuda":
        with pytest.raises(ValueError, match="same device"):
            bias_act(x, bias.cpu())


@pytest.mark.needs_cuda
def test_cpu_and_cuda_agree():
    gen = torch.Generator().manual_seed(13)
    x, bias, r = make_inputs((3, 32, 9, 7), "cpu", torch.bfloat16, gen, bias_fp32=True, channels_last=True)
    assert torch.equal(bias_act(x, bias, r), bias_act(x.cuda(), bias.cuda(), r.cuda()).cpu())


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_registry_cases(device):
    for i, case in enumerate(cases(op="bias_act", device=device)):
        if "bench" in case.tags:
            continue
        for dtype in case.dtypes:
            r = run_case(case, device, dtype, seed=300 + i)
            assert r.passed, r


def test_reference_fallback_warns_once_and_meta_quietly():
    """The ops' shared fallback warning is given once per (op, reason); meta tensors (shape tracing) run the
    reference without one."""
    import warnings

    from detr_fast.ops._ext import warn_fallback

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            warn_fallback("bias_act", "a reason only this test gives")
        out = bias_act(torch.empty(2, 4, 3, 3, device="meta"), torch.empty(4, device="meta"))
    assert [str(w.message) for w in caught] == [
        "detr_fast.ops.bias_act: a reason only this test gives; running reference.bias_act"]
    assert out.shape == (2, 4, 3, 3) and out.device.type == "meta"
