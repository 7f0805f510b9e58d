"""detr_fast.ops.attention: the C++ CPU kernel here and in CI, the CUDA kernels where a GPU exists (same tests).

Outputs and the gradients of q, k, v are compared with the float64 reference by the rule of cases_attention.compare
(fp32 within 1e-5; fp16/bf16 within twice the error of the reference computed in that precision).
"""
import math
import warnings

import pytest
import torch
from helpers import cpu_and_cuda, philox4x32_10

from detr_fast.ops import attention, has_kernel, reference
from detr_fast.ops.attention import attention_with_state, dropout_mask
from detr_fast.ops.cases_attention import LOW_PRECISION, compare, make_inputs
from detr_fast.ops.registry import cases, run_case

pytestmark = pytest.mark.skipif(not has_kernel("attention", "cpu"), reason="detr_fast._C is not built")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _grads(fn, q, k, v, go):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, go)]


def _check_against_reference(q, k, v, mask, go, dtype, p=0.0, seed=None, offset=0):
    """Run the kernel op (explicit seed or the generator) and compare output and grads with the reference given
    the kernel's own dropout mask. Returns the kernel's (out, lse, rng_state)."""
    state = {}

    def ours(q_, k_, v_):
        out, lse, rng = attention_with_state(q_, k_, v_, mask, p, seed=seed, offset=offset)
        state.update(lse=lse, rng=rng)
        return out

    got = _grads(ours, q, k, v, go)
    B, H, Lq, _ = q.shape
    keep = dropout_mask(state["rng"], B, H, Lq, k.shape[2], p) if p > 0 else None
    ref64 = _grads(lambda a, b, c: reference.attention(a, b, c, mask, p, dropout_mask=keep),
                   q.double(), k.double(), v.double(), go.double())
    ref_low = None
    if dtype in LOW_PRECISION:
        ref_low = _grads(lambda a, b, c: reference.attention(a, b, c, mask, p, dropout_mask=keep), q, k, v, go)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert got[i].dtype == dtype and got[i].shape == ref64[i].shape
        err, tol = compare(got[i], ref64[i], ref_low[i] if ref_low else None, dtype)
        assert err <= tol, f"{name}: error {err:.3g} > tolerance {tol:.3g}"
    return got[0], state["lse"], state["rng"]


SHAPES = [  # B, H, Lq, Lk, D
    (2, 2, 7, 7, 32),
    (1, 1, 1, 1, 32),
    (2, 3, 97, 33, 64),
    (1, 2, 1, 97, 32),
    (2, 8, 100, 130, 32),
    (1, 1, 1025, 1025, 32),
]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("masked", (False, True), ids=("nomask", "mask"))
def test_matches_reference(device, dtype, shape, masked):
    B, H, Lq, Lk, D = shape
    gen = torch.Generator().manual_seed(hash((shape, masked)) % 2**31)
    q, k, v, mask = make_inputs(B, H, Lq, Lk, D, device, dtype, gen, "random" if masked else None)
    go = torch.randn(q.shape, generator=gen).to(device, dtype)
    _, lse, rng = _check_against_reference(q, k, v, mask, go, dtype)
    assert rng.tolist() == [0, 0]
    # lse = logsumexp over the unpadded keys of the scaled scores, computed from the same (rounded) inputs.
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * D ** -0.5
    if mask is not None:
        s = s.masked_fill(mask[:, None, None, :], float("-inf"))
    lse_ref = torch.logsumexp(s, -1)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", (0.0, 0.2))
def test_fully_padded_image(device, dtype, p):
    """An image whose keys are all padded: output 0, zero gradients, lse -inf, no NaN anywhere."""
    gen = torch.Generator().manual_seed(3)
    q, k, v, mask = make_inputs(3, 2, 37, 45, 32, device, dtype, gen, [45, 1, 20], full_pad=(1,))
    go = torch.randn(q.shape, generator=gen).to(device, dtype)
    out, lse, rng = _check_against_reference(q, k, v, mask, go, dtype, p=p, seed=11, offset=4)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all() and torch.isfinite(lse[[0, 2]]).all()
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    o, _, _ = attention_with_state(*leaves, mask, p, seed=11, offset=4)
    o.backward(go)
    for t in leaves:
        assert torch.isfinite(t.grad).all() and (t.grad[1] == 0).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_padding_per_image(device, dtype):
    """Different kept lengths per image, and padded keys get zero gradients."""
    gen = torch.Generator().manual_seed(5)
    lengths = [50, 1, 17, 33]
    q, k, v, mask = make_inputs(4, 2, 19, 50, 64, device, dtype, gen, lengths)
    go = torch.randn(q.shape, generator=gen).to(device, dtype)
    _check_against_reference(q, k, v, mask, go, dtype)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    attention(*leaves, mask).backward(go)
    for b, n in enumerate(lengths):
        assert (leaves[1].grad[b, :, n:] == 0).all() and (leaves[2].grad[b, :, n:] == 0).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", (0.1, 0.5))
def test_dropout_backward_uses_forward_mask(device, dtype, p):
    """Dropout drawn from the generator: output and grads equal the reference given the mask the kernel used."""
    gen = torch.Generator().manual_seed(7)
    q, k, v, mask = make_inputs(2, 3, 70, 75, 32, device, dtype, gen, "random")
    go = torch.randn(q.shape, generator=gen).to(device, dtype)
    _, _, rng = _check_against_reference(q, k, v, mask, go, dtype, p=p)
    assert rng.device == q.device and rng.dtype == torch.int64 and rng[0].item() >= 0


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_dropout_reproducible_under_manual_seed(device):
    gen = torch.Generator().manual_seed(8)
    q, k, v, mask = make_inputs(2, 2, 33, 40, 32, device, torch.float32, gen, "random")
    torch.manual_seed(123)
    a1, a2 = attention(q, k, v, mask, 0.3), attention(q, k, v, mask, 0.3)
    torch.manual_seed(123)
    b1, b2 = attention(q, k, v, mask, 0.3), attention(q, k, v, mask, 0.3)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)  # successive calls draw fresh masks
    torch.manual_seed(124)
    assert not torch.equal(attention(q, k, v, mask, 0.3), a1)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("p", (0.1, 0.5))
def test_dropout_kept_fraction(device, p):
    """Kept fraction of a 1.4M-element mask within 8 standard deviations of 1 - p (fixed seeds: deterministic)."""
    B, H, Lq, Lk = 2, 8, 300, 301
    for seed, offset in ((0, 0), (2**40 + 17, 1 << 33)):
        keep = dropout_mask(torch.tensor([seed, offset], device=device), B, H, Lq, Lk, p)
        n = keep.numel()
        frac = keep.double().mean().item()
        assert abs(frac - (1 - p)) < 8 * math.sqrt(p * (1 - p) / n)
        # every (b, h) slice and every query row keeps about 1 - p as well
        per_row = keep.double().mean(-1)
        assert abs(per_row.mean().item() - (1 - p)) < 8 * math.sqrt(p * (1 - p) / n)
        assert per_row.std().item() < 2 * math.sqrt(p * (1 - p) / Lk)


def test_philox_known_answers():
    """Random123's published known-answer vectors for philox4x32-10."""
    assert philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    M = 0xFFFFFFFF
    assert philox4x32_10((M, M, M, M), (M, M)) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == (
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_dropout_mask_follows_documented_stream(device):
    """attention_dropout_mask equals the stream documented in philox.h, computed here in Python."""
    B, H, Lq, Lk, p = 2, 2, 19, 5, 0.3
    seed, offset = 0x1234_5678_9ABC, (1 << 32) - 2  # offset + bh crosses a 32-bit boundary
    keep = dropout_mask(torch.tensor([seed, offset], device=device), B, H, Lq, Lk, p).cpu()
    thr = int(p * 2**32)
    for bh in range(B * H):
        sub = offset + bh
        for i in range(Lq):
            for j in range(Lk):
                words = philox4x32_10((j >> 1, 0x40000000 | ((i >> 4) << 3) | (i & 7), sub & 0xFFFFFFFF, sub >> 32),
                                       (seed & 0xFFFFFFFF, seed >> 32))
                w = words[(j & 1) | (((i >> 3) & 1) << 1)]
                assert bool(keep.view(B * H, Lq, Lk)[bh, i, j]) == (w >= thr), (bh, i, j)


@pytest.mark.needs_cuda
def test_cpu_and_cuda_agree_on_dropout():
    gen = torch.Generator().manual_seed(9)
    q, k, v, mask = make_inputs(2, 2, 65, 70, 32, "cpu", torch.float32, gen, "random")
    rng = torch.tensor([987654321, 12])
    assert torch.equal(dropout_mask(rng, 2, 2, 65, 70, 0.25), dropout_mask(rng.cuda(), 2, 2, 65, 70, 0.25).cpu())
    out_cpu = attention_with_state(q, k, v, mask, 0.25, seed=987654321, offset=12)[0]
    out_gpu = attention_with_state(q.cuda(), k.cuda(), v.cuda(), mask.cuda(), 0.25, seed=987654321, offset=12)[0]
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", (False, True))
@pytest.mark.parametrize("p", (0.0, 0.3))
def test_gradcheck_float64(masked, p):
    gen = torch.Generator().manual_seed(10)
    for (B, H, Lq, Lk, D), fast in (((2, 1, 4, 5, 8), False), ((2, 1, 3, 4, 32), True)):
        q, k, v, mask = make_inputs(B, H, Lq, Lk, D, "cpu", torch.float64, gen, [Lk, 2] if masked else None)
        leaves = [t.requires_grad_(True) for t in (q, k, v)]

        def fn(a, b, c):
            return attention_with_state(a, b, c, mask, p, seed=5, offset=0)[0]

        assert torch.autograd.gradcheck(fn, leaves, fast_mode=fast)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_non_contiguous_inputs(device):
    """q, k, v as views of [B, L, H, D] projections (DETR's layout) and a strided mask."""
    gen = torch.Generator().manual_seed(12)
    B, H, L, D = 2, 4, 45, 32
    x = torch.randn(B, L, 3, H, D, generator=gen).to(device)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    mask = torch.zeros(B, 2 * L, dtype=torch.bool, device=device)[:, ::2]
    mask[1, 30:] = True
    go = torch.randn(B, H, L, D, generator=gen).to(device)
    got = _grads(lambda a, b, c: attention(a, b, c, mask), q, k, v, go)
    want = _grads(lambda a, b, c: attention(a, b, c, mask.contiguous()), q.contiguous(), k.contiguous(),
                  v.contiguous(), go)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_autocast(device):
    """fp32 inputs under bf16 autocast run the bf16 kernel; gradients come back in fp32."""
    gen = torch.Generator().manual_seed(13)
    q, k, v, mask = make_inputs(2, 2, 20, 24, 32, device, torch.float32, gen, "random")
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    with torch.autocast(device, dtype=torch.bfloat16):
        out = attention(*leaves, mask)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask))
    out.float().sum().backward()
    assert all(t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_torch_compile(device):
    gen = torch.Generator().manual_seed(14)
    q, k, v, mask = make_inputs(2, 2, 17, 19, 32, device, torch.float32, gen, "random")
    go = torch.randn(q.shape, generator=gen).to(device)
    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
    got = _grads(lambda a, b, c: compiled(a, b, c, mask), q, k, v, go)
    want = _grads(lambda a, b, c: attention(a, b, c, mask), q, k, v, go)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_opcheck(device, dtype):
    gen = torch.Generator().manual_seed(15)
    q, k, v, mask = make_inputs(2, 2, 9, 11, 32, device, dtype, gen, "random")
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    for m, p, seed in ((None, 0.0, None), (mask, 0.0, None), (mask, 0.25, 77)):
        torch.library.opcheck(torch.ops.detr_fast.attention.default, (*leaves, m, p, seed, 3))
    out, lse, rng, out_f32 = torch.ops.detr_fast.attention(*leaves, mask, 0.25, 77, 3)
    saved = out_f32 if dtype in LOW_PRECISION else out
    torch.library.opcheck(torch.ops.detr_fast.attention_backward.default,
                          (torch.randn_like(out), *[t.detach() for t in leaves], saved.detach(), lse, mask, 0.25, rng))
    torch.library.opcheck(torch.ops.detr_fast.attention_dropout_mask.default, (rng, 2, 2, 9, 11, 0.25))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_head_dim_outside_fused_kernels(device):
    """Head dim 16: the CPU kernel takes it; on CUDA the op falls back to the reference with a warning."""
    gen = torch.Generator().manual_seed(16)
    q, k, v, mask = make_inputs(2, 2, 10, 12, 16, device, torch.float32, gen, "random")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = attention(q, k, v, mask)
    assert any("head dim 16" in str(x.message) for x in w) == (device == "cuda")
    torch.testing.assert_close(out, reference.attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("sizes", [(0, 2, 5, 6), (2, 2, 0, 6), (2, 2, 5, 0)], ids=("B0", "Lq0", "Lk0"))
def test_empty(device, sizes):
    B, H, Lq, Lk = sizes
    q = torch.randn(B, H, Lq, 32, device=device, requires_grad=True)
    k = torch.randn(B, H, Lk, 32, device=device, requires_grad=True)
    v = torch.randn(B, H, Lk, 32, device=device, requires_grad=True)
    out = attention(q, k, v, torch.zeros(B, Lk, dtype=torch.bool, device=device), 0.1)
    assert out.shape == (B, H, Lq, 32) and (out == 0).all()
    out.sum().backward()
    assert all(t.grad.shape == t.shape and (t.grad == 0).all() for t in (q, k, v))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_bad_input(device):
    def t(*s, dtype=torch.float32):
        return torch.zeros(*s, dtype=dtype, device=device)

    q, k, m = t(2, 2, 5, 32), t(2, 2, 6, 32), t(2, 6, dtype=torch.bool)
    bad = [
        ((t(2, 5, 32), k, k, m), "dimensions"),
        ((q, k, t(2, 2, 7, 32), m), "same shape"),
        ((q, t(2, 3, 6, 32), t(2, 3, 6, 32), m), "disagree"),
        ((q, t(2, 2, 6, 64), t(2, 2, 6, 64), m), "disagree"),
        ((q, k.double(), k, m), "one dtype"),
        ((q.long(), k.long(), k.long(), m), "floating"),
        ((q, k, k, t(2, 6)), "bool"),
        ((q, k, k, t(2, 5, dtype=torch.bool)), "shape"),
        ((q, k, k, t(3, 6, dtype=torch.bool)), "shape"),
    ]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            attention(*args)
    for p in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout_p"):
            attention(q, k, k, m, p)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_registry_cases(device):
    for i, case in enumerate(cases(op="attention", device=device)):
        if "bench" in case.tags:
            continue
        for dtype in case.dtypes:
            r = run_case(case, device, dtype, seed=100 + i)
            assert r.passed, r


def test_backward_materializes_no_zero_gradients():
    """Only `out` is differentiable: the backward gets no zero-filled gradients for lse, rng_state and out_f32
    (each would be a kernel launch per call in every training step)."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    from detr_fast.ops.layernorm import add_dropout_layernorm_with_state

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(2, 2, 5, 32, generator=gen, dtype=torch.bfloat16).requires_grad_(True) for _ in range(3))
    x, r = (torch.randn(6, 16, generator=gen).requires_grad_(True) for _ in range(2))
    w, b = torch.ones(16, requires_grad=True), torch.zeros(16, requires_grad=True)
    loss = attention_with_state(q, k, v, None, 0.0)[0].float().sum() + \
        add_dropout_layernorm_with_state(x, r, w, b, 0.1, 1e-5, seed=3)[0].sum()
    with Count() as c:
        loss.backward()
    zero_fills = {n: c.ops[n] for n in ("zeros", "zeros_like", "new_zeros", "fill_", "zero_") if c.ops[n]}
    assert not zero_fills, zero_fills
    assert all(t.grad is not None for t in (q, k, v, x, r, w, b))


@pytest.mark.needs_cuda
@pytest.mark.parametrize("graph", (False, True))
def test_cuda_backward_streams_and_saved_flags_change_nothing(monkeypatch, graph):
    """The bf16 backward with dQ on a second stream beside dK/dV (the default), both on one stream
    (DETR_FAST_ATTN_CONCURRENT_BWD=0), and with the dropout flags drawn again instead of read
    (DETR_FAST_ATTN_KEEP_BITS=0): the same gradients bit for bit, eagerly and replayed from a CUDA graph, for the
    decoder's shapes (100 queries against 1050 padded keys) and an encoder-like self-attention."""
    gen = torch.Generator().manual_seed(21)
    for (Lq, Lk) in ((100, 1050), (333, 333)):
        q, k, v, mask = make_inputs(2, 8, Lq, Lk, 32, "cpu", torch.bfloat16, gen, "random")
        go = torch.randn(q.shape, generator=gen).to(torch.bfloat16).cuda()
        q, k, v, mask = (t.cuda() for t in (q, k, v, mask))
        results = []
        for concurrent, bits in (("1", "1"), ("0", "1"), ("1", "0")):
            monkeypatch.setenv("DETR_FAST_ATTN_CONCURRENT_BWD", concurrent)
            monkeypatch.setenv("DETR_FAST_ATTN_KEEP_BITS", bits)
            qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

            def run():
                out = attention_with_state(qq, kk, vv, mask, 0.2, seed=77, offset=4)[0]
                return torch.autograd.grad(out, (qq, kk, vv), go)

            if graph:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    run()  # warm-up outside the capture
                torch.cuda.current_stream().wait_stream(side)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    grads = run()
                g.replay()
                torch.cuda.synchronize()
                results.append([t.clone() for t in grads])
            else:
                results.append(run())
        for other in results[1:]:
            assert all(torch.equal(a, b) for a, b in zip(results[0], other))
