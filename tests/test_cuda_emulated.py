"""The CUDA kernels of add_dropout_layernorm, relu_dropout, bias_act, relu_backward_sum, scale_many, max_pool2d_nhwc,
linear_assignment, matching_cost, box_loss and attention, run on the CPU through the host emulator of tests/emulator/,
here and in CI; and the same kernels under ThreadSanitizer (tests/emulator/race_check.py).

The emulator compiles the kernel headers (csrc/*/*_kernels.cuh, attention_launch.cuh) for the host: each CUDA
thread is a fiber, __syncthreads and warp shuffles are barriers, atomics are std::atomic_ref, and the launchers run
as in the device build (dtype dispatch, 4- and 16-byte vector paths, grid sizes, the LayerNorm backward's per-group
partial sums, BLHD strides), with `sms` standing in for the device's SM count (sms=1 makes every grid-stride loop go
round). Outputs and gradients are compared with the float64 reference by the rule of cases_attention.compare
(fp32/fp64 within 1e-5; fp16/bf16 within twice the error of the reference computed in that precision), given the
dropout mask of the CPU kernel, which must equal the emulated mask kernel's bit for bit. linear_assignment's block
solver (warp bids with atomics, block reductions, __syncthreads_or, dynamic shared memory) is checked against
scipy. The attention kernels (forward, dq and dk/dv; fp32 and mma.sync bf16/fp16) run through attention_emulator.cpp
with tests/emulator/run_attention.py's cases. On a GPU the same kernels run in the op tests (test_layernorm.py and
the others); what emulation cannot show (the device's fast-math rounding, races between blocks) is left to those.
"""
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from helpers import assert_layernorm_stats

from detr_fast.ops import has_kernel, reference
from detr_fast.ops.assignment import check_assignment
from detr_fast.ops.cases_assignment import FAMILIES, REL_TOL, make_costs, totals
from detr_fast.ops.cases_attention import LOW_PRECISION, compare
from detr_fast.ops.cases_bias_act import make_inputs as bias_act_inputs
from detr_fast.ops.cases_bias_act import make_sum_inputs
from detr_fast.ops.cases_bias_act import references as bias_act_references
from detr_fast.ops.cases_bias_act import same_layout
from detr_fast.ops.cases_layernorm import make_inputs as ln_inputs
from detr_fast.ops.cases_relu_dropout import references as relu_dropout_references
from detr_fast.ops.cases_box import box_pairs
from detr_fast.ops.layernorm import dropout_mask
from detr_fast.ops.registry import cases

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "emulator"))
import race_check  # noqa: E402
import run_attention  # noqa: E402
from build import build_kernels, cuda_include  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not has_kernel("add_dropout_layernorm", "cpu"), reason="detr_fast._C is not built"),
    pytest.mark.skipif(cuda_include() is None, reason="no CUDA toolkit headers to compile the emulator against"),
]

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SEED, OFFSET = 0x5DEECE66D, 12


@pytest.fixture(scope="module")
def emu():
    return build_kernels()


def _assert_close(name, got, ref64, ref_low, dtype):
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    err, tol = compare(got, ref64, ref_low, dtype)
    assert err <= tol, f"{name}: error {err:.3g} > tolerance {tol:.3g}"


def test_emulator_reports_a_divergent_barrier(emu):
    """A thread that returns while its block waits at __syncthreads is an error, not a hang."""
    with pytest.raises(RuntimeError, match="barrier can never complete"):
        emu.divergent_barrier()


# ---- add_dropout_layernorm ---------------------------------------------------------------------------------------

def _ln_grads(x, residual, weight, bias, go, p, keep, eps=1e-5):
    """(out, dx, dresidual, dweight, dbias) of the reference given keep, computed in the inputs' dtypes."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, residual, weight, bias)]
    out = reference.add_dropout_layernorm(*leaves, p, keep is not None, eps, dropout_mask=keep)
    return [out.detach(), *torch.autograd.grad(out, leaves, go)]


def _ln_check(emu, x, residual, weight, bias, p, sms=2, eps=1e-5, stats=None):
    """Emulated forward and backward against the reference; returns (out, dx, dresidual, dweight, dbias) and checks
    rng_state; mean and rstd through `stats` when given (a dict)."""
    out, mean, rstd, rng = emu.add_dropout_layernorm(x, residual, weight, bias, p, eps, SEED if p else None, OFFSET,
                                                    sms=sms)
    assert rng.tolist() == ([SEED, OFFSET] if p else [0, 0])
    if stats is not None:
        stats.update(mean=mean, rstd=rstd)
    d = x.shape[-1]
    rows = math.prod(x.shape[:-1])
    keep = None
    if p > 0:
        keep = dropout_mask(rng, rows, d, p)  # the CPU kernel's mask
        assert torch.equal(emu.add_dropout_layernorm_mask(rng, rows, d, p, sms=sms), keep)
    go = torch.randn(x.shape, generator=torch.Generator().manual_seed(d + rows)).to(residual.dtype)
    got = [out, *emu.add_dropout_layernorm_backward(go, x, residual, weight, mean, rstd, p, rng, sms=sms)]
    ref64 = _ln_grads(x.double(), residual.double(), weight.double(), bias.double(), go.double(), p, keep, eps)
    # the low-precision reference: the op's own precision (x's dtype; the residual's when x is mixed with fp32)
    dtype = residual.dtype
    ref_low = None
    if dtype in LOW_PRECISION:
        ref_low = _ln_grads(x, residual, weight.to(dtype), bias.to(dtype), go, p, keep, eps)
    for i, name in enumerate(("out", "dx", "dresidual", "dweight", "dbias")):
        want = (residual.dtype, x.dtype, residual.dtype, weight.dtype, weight.dtype)[i]
        assert got[i].dtype == want, f"{name}: dtype {got[i].dtype}, want {want}"
        if name == "dx" and x.dtype != dtype:  # mixed: the fp32 rule plus one rounding to x's dtype
            scale = max(ref64[i].abs().max().item(), 1.0) if ref64[i].numel() else 1.0
            ulp = 2.0 ** -8 if x.dtype == torch.bfloat16 else 2.0 ** -11
            err = (got[i].double() - ref64[i]).abs().max().item() if ref64[i].numel() else 0.0
            assert err <= (ulp + 1e-5) * scale, f"dx: error {err:.3g}"
            continue
        _assert_close(name, got[i].to(dtype) if i >= 3 else got[i], ref64[i], ref_low[i] if ref_low else None, dtype)
    return got


# Every launch configuration: a warp per row with 1, 2, 4, 8 vectors per lane (d <= 128, 256, 512, 1024) and a
# 256-thread block per row with 2, 4, 8 (d <= 2048, 4096, 8192); d % 4 == 0 (vector loads) and not; no rows.
LN_SHAPES = [(1, 1), (4, 7), (3, 33), (17, 128), (5, 3, 256), (9, 510), (2, 1024), (3, 1025), (2, 2048), (2, 4100),
             (1, 8192), (0, 256)]


@pytest.mark.parametrize("shape", LN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", (0.0, 0.3))
def test_layernorm_matches_reference(emu, shape, dtype, p):
    gen = torch.Generator().manual_seed(hash((shape, p)) % 2**31)
    x, residual, weight, bias = ln_inputs(shape, "cpu", dtype, gen)
    stats = {}
    _ln_check(emu, x, residual, weight, bias, p, stats=stats)
    if p == 0:
        assert_layernorm_stats(x, residual, stats["mean"], stats["rstd"])
    else:
        assert stats["mean"].shape == stats["rstd"].shape == (math.prod(shape[:-1]),)


@pytest.mark.parametrize("xdtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(4, 7), (17, 128), (2, 1024), (3, 1025), (2, 4100)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", (0.0, 0.2))
def test_layernorm_mixed_low_precision_x_float32_residual(emu, xdtype, shape, p):
    """Autocast's residual stream: a bf16/fp16 x read as it is, an fp32 residual, out and dresidual in fp32; bit for
    bit what the fp32 kernel gives on x cast to fp32 first (dx then rounded once to x's dtype)."""
    gen = torch.Generator().manual_seed(hash((shape, p, str(xdtype))) % 2**31)
    x, residual, weight, bias = ln_inputs(shape, "cpu", torch.float32, gen)
    x = x.to(xdtype)
    mixed = _ln_check(emu, x, residual, weight, bias, p)
    upcast = _ln_check(emu, x.float(), residual, weight, bias, p)
    for i, name in enumerate(("out", "dx", "dresidual", "dweight", "dbias")):
        assert torch.equal(mixed[i], upcast[i].to(xdtype) if name == "dx" else upcast[i]), name


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_layernorm_float32_parameters(emu, dtype):
    gen = torch.Generator().manual_seed(21)
    x, residual, weight, bias = ln_inputs((37, 256), "cpu", dtype, gen, param_dtype=torch.float32)
    _ln_check(emu, x, residual, weight, bias, 0.1)


@pytest.mark.parametrize("d", (256, 2048))
def test_layernorm_unaligned_and_strided(emu, d):
    """d % 4 == 0 but x and residual start off a vector boundary (the scalar path), and strided views."""
    gen = torch.Generator().manual_seed(d)
    x, residual, weight, bias = ln_inputs((5 * d + 1,), "cpu", torch.float32, gen)
    x, residual = x[1:].view(5, d), residual[1:].view(5, d)
    assert x.data_ptr() % 16 != 0
    _ln_check(emu, x, residual, weight[:d], bias[:d], 0.25)
    xt = torch.randn(d, 6, generator=gen).t()
    _ln_check(emu, xt, torch.randn(6, 2 * d, generator=gen)[:, ::2], weight[:d], bias[:d], 0.0)


@pytest.mark.parametrize("sms", (1, 3, 64))
def test_layernorm_backward_grid_sizes(emu, sms):
    """The backward's groups fold several rows each (sms=1: 2 blocks for 61 rows) or one (sms=64); equal results."""
    gen = torch.Generator().manual_seed(5)
    for shape in ((61, 96), (13, 1500)):
        x, residual, weight, bias = ln_inputs(shape, "cpu", torch.float32, gen)
        _ln_check(emu, x, residual, weight, bias, 0.2, sms=sms)


def test_layernorm_zero_rows_write_rng_state(emu):
    x, residual, weight, bias = ln_inputs((0, 64), "cpu", torch.float32, torch.Generator().manual_seed(0))
    out, mean, rstd, rng = emu.add_dropout_layernorm(x, residual, weight, bias, 0.5, 1e-5, 77, 4)
    assert out.shape == (0, 64) and mean.shape == (0,) and rng.tolist() == [77, 4]


@pytest.mark.parametrize("rows,d", [(1, 1), (3, 5), (64, 100), (9, 8192), (1000, 3)])
def test_layernorm_mask_kernel_equals_cpu(emu, rows, d):
    for p in (0.1, 0.6):
        rng = torch.tensor([SEED + rows, (1 << 32) - 2])  # offset + row crosses a 32-bit boundary
        assert torch.equal(emu.add_dropout_layernorm_mask(rng, rows, d, p, sms=1), dropout_mask(rng, rows, d, p))


def test_layernorm_bad_inputs(emu):
    x = torch.randn(3, 8)
    w, b = torch.ones(8), torch.zeros(8)
    with pytest.raises(ValueError, match="d must be at most 8192"):
        emu.add_dropout_layernorm(torch.randn(1, 8200), torch.randn(1, 8200), torch.ones(8200), torch.zeros(8200),
                                  0.0, 1e-5)
    with pytest.raises(ValueError, match="same shape"):
        emu.add_dropout_layernorm(x, torch.randn(3, 9), w, b, 0.0, 1e-5)
    with pytest.raises(ValueError, match="explicit seed"):
        emu.add_dropout_layernorm(x, x, w, b, 0.1, 1e-5)


# ---- relu_dropout --------------------------------------------------------------------------------------------------

def _relu_dropout_check(emu, x, p, sms=2):
    out, rng = emu.relu_dropout(x, p, SEED if p else None, OFFSET, sms=sms)
    assert rng.tolist() == ([SEED, OFFSET] if p else [0, 0])
    assert out.dtype == x.dtype and out.shape == x.shape
    rows, d = math.prod(x.shape[:-1]), x.shape[-1]
    keep = dropout_mask(rng, rows, d, p) if p > 0 else None
    go = torch.randn(x.shape, generator=torch.Generator().manual_seed(rows + d)).to(x.dtype)
    dx = emu.relu_dropout_backward(go, out, p, sms=sms)
    r64, rlow = relu_dropout_references(x, go, p, keep)
    for i, (name, got) in enumerate((("out", out), ("dx", dx))):
        assert got.dtype == x.dtype
        _assert_close(name, got, r64[i], rlow[i] if rlow else None, x.dtype)


RD_SHAPES = [(1, 1), (4, 7), (3, 33), (17, 128), (5, 3, 256), (0, 256), (2, 1025), (9, 2048)]


@pytest.mark.parametrize("shape", RD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", (0.0, 0.1, 0.5))
def test_relu_dropout_matches_reference(emu, shape, dtype, p):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(hash((shape, p)) % 2**31)).to(dtype)
    _relu_dropout_check(emu, x, p)


def test_relu_dropout_unaligned_grid_stride_and_specials(emu):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(7 * 64 + 1, generator=gen)[1:].view(7, 64)  # d % 4 == 0, off a vector boundary
    assert x.data_ptr() % 16 != 0
    _relu_dropout_check(emu, x, 0.3, sms=1)
    x = torch.randn(300, 40, generator=gen)  # 3000 vectors over 8 blocks of 256 threads: grid-stride
    _relu_dropout_check(emu, x, 0.3, sms=1)
    s = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -1.0, 2.0]])
    out, rng = emu.relu_dropout(s, 0.0, None, 0)
    ref = reference.relu_dropout(s, 0.0, False)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out[~ref.isnan()], ref[~ref.isnan()])


def test_relu_dropout_empty_writes_rng_state(emu):
    out, rng = emu.relu_dropout(torch.empty(0, 16), 0.2, 5, 8)
    assert out.shape == (0, 16) and rng.tolist() == [5, 8]


# ---- bias_act ----------------------------------------------------------------------------------------------------

# As test_bias_act.SHAPES: odd sizes, channels_last with C a multiple of every vector width (16-byte vectors: 8, 16,
# 64 channels) and not (3, 5); inner sizes with and without a multiple of the vector width; 2-D, 3-D and empty.
BA_SHAPES = [((2, 3, 5, 7), False), ((2, 3, 5, 7), True), ((3, 16, 9, 11), True), ((2, 64, 13, 6), True),
             ((2, 8, 4, 4), False), ((1, 5, 1, 1), True), ((4, 37), False), ((2, 8, 33), False), ((4, 16), False),
             ((2, 24, 16), False), ((0, 16, 4, 4), True), ((2, 16, 0, 5), False)]


def _bias_act_check(emu, x, bias, residual, relu, sms=2):
    out = emu.bias_act(x, bias, residual, relu, sms=sms)
    assert out.dtype == x.dtype and same_layout(out, x), "output dtype / layout"
    ref64, ref_low = bias_act_references(x, bias, residual, relu)
    _assert_close("out", out, ref64, ref_low, x.dtype)


@pytest.mark.parametrize("shape,cl", BA_SHAPES, ids=lambda s: "x".join(map(str, s)) if isinstance(s, tuple) else
                         ("cl" if s else "nchw"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", (True, False), ids=("res", "nores"))
@pytest.mark.parametrize("relu", (True, False), ids=("relu", "norelu"))
def test_bias_act_matches_reference(emu, shape, cl, dtype, residual, relu):
    gen = torch.Generator().manual_seed(hash((shape, cl, residual, relu)) % 2**31)
    x, bias, r = bias_act_inputs(shape, "cpu", dtype, gen, residual=residual, channels_last=cl)
    _bias_act_check(emu, x, bias, r, relu)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_bias_act_float32_bias(emu, dtype):
    for shape, cl in (((2, 16, 5, 8), True), ((2, 16, 5, 8), False)):
        x, bias, r = bias_act_inputs(shape, "cpu", dtype, torch.Generator().manual_seed(3), bias_fp32=True,
                                     channels_last=cl)
        _bias_act_check(emu, x, bias, r, True)


def test_bias_act_unaligned_and_grid_stride(emu):
    """A 16-byte-vector shape whose x starts off a 16-byte boundary takes the scalar path; sms=1 with many vectors
    makes the grid-stride loop go round on both paths."""
    gen = torch.Generator().manual_seed(4)
    n = 2 * 16 * 8 * 8
    x = torch.randn(n + 1, generator=gen)[1:].view(2, 16, 8, 8)
    assert x.data_ptr() % 16 != 0
    _bias_act_check(emu, x, torch.randn(16, generator=gen), None, True, sms=1)
    for cl in (False, True):
        x, bias, r = bias_act_inputs((8, 32, 24, 24), "cpu", torch.bfloat16, gen, channels_last=cl)
        _bias_act_check(emu, x, bias, r, True, sms=1)


# ---- relu_backward_sum ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,out_cl,grads_cl", [
    ((2, 3, 5, 7), False, None), ((2, 3, 5, 7), True, None), ((3, 16, 9, 11), True, False), ((2, 8, 5, 5), False, True),
    ((4, 37), False, None), ((1003,), False, None), ((0, 16, 4, 4), True, None), ((2, 16, 0, 5), False, None)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_relu_backward_sum_matches_reference(emu, shape, out_cl, grads_cl, dtype):
    """Bit for bit the reference's sum and mask, in out's layout; sizes with a tail past the last 16-byte vector."""
    gen = torch.Generator().manual_seed(hash((shape, out_cl, grads_cl)) % 2**31)
    a, b, out = make_sum_inputs(shape, "cpu", dtype, gen, out_cl, grads_cl)
    got = emu.relu_backward_sum(a, b, out)
    assert got.dtype == dtype and same_layout(got, out)
    assert torch.equal(got, reference.relu_backward_sum(a, b, out))


def test_relu_backward_sum_unaligned_and_grid_stride(emu):
    """A gradient starting off a 16-byte boundary takes the one-element path; sms=1 with many vectors makes both
    loops go round; NaN in out lets the sum through as threshold_backward does."""
    gen = torch.Generator().manual_seed(6)
    n = 8 * 32 * 24 * 24 + 3
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.randn(n + 1, generator=gen).to(dtype)[1:]
        assert a.data_ptr() % 16 != 0
        b, out = torch.randn(n, generator=gen).to(dtype), torch.randn(n, generator=gen).relu().to(dtype)
        out[::97] = float("nan")
        for x in (a, a.clone()):
            got = emu.relu_backward_sum(x, b, out, sms=1)
            want = reference.relu_backward_sum(x, b, out)
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


# ---- scale_many --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                (torch.float32, torch.float32), (torch.float64, torch.float64),
                                                (torch.float16, torch.float16), (torch.float32, torch.float16)])
@pytest.mark.parametrize("sms", [1, 3])
def test_scale_many_matches_reference(emu, in_dtype, out_dtype, sms):
    """Bit for bit against reference.scale_many (one product per tensor, rounded once), with 61 tensors of odd
    channel counts (two launches of at most 48), channels_last and contiguous, empty ones, and sms=1 so that each
    block strides over its tensor."""
    gen = torch.Generator().manual_seed(31)
    shapes = [(int(c), int(k), 3, 3) for c, k in torch.randint(1, 23, (61, 2), generator=gen)]
    shapes[5], shapes[40] = (0, 4, 3, 3), (7, 0, 1, 1)
    xs = [torch.randn(*sh, generator=gen, dtype=torch.float64).to(in_dtype) for sh in shapes]
    xs = [x.contiguous(memory_format=torch.channels_last) if i % 2 else x for i, x in enumerate(xs)]
    scale = torch.rand(sum(sh[0] for sh in shapes), generator=gen, dtype=torch.float64) + 0.5
    scale = scale.to(torch.float64 if torch.float64 in (in_dtype, out_dtype) else torch.float32)
    got = emu.scale_many(xs, scale, torch.empty(0, dtype=out_dtype), sms=sms)
    want = reference.scale_many(xs, scale, out_dtype)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.stride() == w.stride() and torch.equal(g, w)


def test_scale_many_refuses_bad_arguments(emu):
    x = torch.ones(4, 2, 3, 3)
    with pytest.raises(ValueError, match="one value per channel"):
        emu.scale_many([x], torch.ones(3), torch.empty(0), sms=2)


# ---- max_pool2d_nhwc ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,kernel,stride,padding", [((2, 64, 13, 11), 3, 2, 1), ((3, 5, 9, 7), 3, 2, 1),
                                                         ((1, 16, 6, 5), (3, 2), (1, 2), (1, 0))])
@pytest.mark.parametrize("sms", [1, 4])
def test_max_pool_nhwc_matches_torch(emu, dtype, shape, kernel, stride, padding, sms):
    """Bit for bit against torch's max_pool2d, NaN and -inf in the windows; channel counts on the 16-byte vector path
    (64, 16) and off it (5); sms=1 makes the grid-stride loop go round."""
    from detr_fast.ops.cases_pool import make_input, mismatches

    gen = torch.Generator().manual_seed(41)
    x = make_input(shape, "cpu", dtype, gen)
    k, s, p = ([v, v] if isinstance(v, int) else list(v) for v in (kernel, stride, padding))
    assert mismatches(emu.max_pool2d_nhwc(x, k, s, p, sms=sms), x, kernel, stride, padding) == 0


# ---- space_to_depth ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                                (torch.float32, torch.float32), (torch.float16, torch.float64)])
@pytest.mark.parametrize("shape,kernel,padding,channels", [((2, 3, 13, 11), 7, (3, 3), 16),
                                                           ((1, 3, 9, 8), 7, (3, 3), 12),
                                                           ((2, 5, 6, 7), 3, (1, 0), 24),
                                                           ((1, 2, 5, 5), 5, (0, 2), 9)])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "strided"])
@pytest.mark.parametrize("sms", [1, 4])
def test_space_to_depth_matches_reference(emu, in_dtype, out_dtype, shape, kernel, padding, channels, layout, sms):
    """Bit for bit against reference.space_to_depth (a copy and a cast): the 16-byte vector path (16 and 24 channels
    of 2-byte or 4-byte elements) and the element path (12, 9 channels; 8-byte elements), channels_last, contiguous
    and strided inputs, sms=1 making the grid-stride loop go round."""
    gen = torch.Generator().manual_seed(43)
    x = torch.randn(*shape, generator=gen).to(in_dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(shape[0], shape[1], shape[2] + 3, 2 * shape[3], generator=gen).to(in_dtype)[:, :, 2:-1, ::2]
    out = emu.space_to_depth(x, kernel, list(padding), channels, torch.empty(0, dtype=out_dtype), sms=sms)
    want = reference.space_to_depth(x, kernel, padding, channels, out_dtype)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == out_dtype
    assert torch.equal(out, want)


def test_space_to_depth_refuses_bad_arguments(emu):
    x = torch.randn(1, 3, 5, 5)
    like = torch.empty(0)
    for kernel, padding, channels, match in [(4, [1, 1], 16, "odd"), (7, [-1, 0], 16, "non-negative"),
                                             (7, [0, 0], 16, "smaller than the kernel"), (7, [3, 3], 11, "at least")]:
        with pytest.raises(ValueError, match=match):
            emu.space_to_depth(x, kernel, padding, channels, like, sms=2)


# ---- linear_assignment -------------------------------------------------------------------------------------------

ENGINES = {"auto": 0, "auction": 1, "ssp": 2}
# Q <= 128 runs 128 threads, larger Q 256; T x Q costs up to 64 KiB are cached in shared memory (100 x 30 float64
# is), larger ones read from global memory (300 x 300 float32 is not cached).
LA_SIZES = [(1, 1, 4), (5, 5, 6), (7, 4, 8), (13, 9, 6), (34, 20, 4), (100, 30, 6), (100, 100, 1), (150, 7, 4),
            (300, 30, 2)]


def _assert_optimal(cost, n, out, what):
    ours, ref, scale = totals(cost, n, out)
    err = np.abs(ours - ref) - REL_TOL * scale
    assert (err <= 0).all(), f"{what}: worst problem {err.argmax()} ours {ours[err.argmax()]} scipy {ref[err.argmax()]}"


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("family", FAMILIES)
def test_assignment_matches_scipy(emu, engine, family):
    gen = torch.Generator().manual_seed(hash((engine, family)) % 2**31)
    for Q, T, num in LA_SIZES:
        n = torch.randint(0, T + 1, (num,), generator=gen)
        n[0] = T
        for dtype in (torch.float32, torch.float64) if Q <= 34 else (torch.float64 if Q == 100 else torch.float32,):
            cost = make_costs(family, (num, Q, T), n, gen, dtype)
            out = emu.linear_assignment(cost, n, ENGINES[engine])
            assert out.shape == (num, Q) and out.dtype == torch.int64
            _assert_optimal(cost, n, out, f"{engine} {family} Q={Q} T={T} {dtype}")


def test_assignment_uncached_costs_and_stacked_layers(emu):
    """300 x 300 float32 costs (360 KiB) are read from global memory; a [L, B, Q, T] stack is L * B problems."""
    gen = torch.Generator().manual_seed(11)
    n = torch.tensor([300])
    cost = make_costs("uniform", (1, 300, 300), n, gen)
    _assert_optimal(cost, n, emu.linear_assignment(cost, n, 0), "300x300")
    n = torch.tensor([3, 0, 7])
    cost = make_costs("detr", (2, 3, 20, 7), n, gen)
    out = emu.linear_assignment(cost, n, 0)
    assert out.shape == (2, 3, 20)
    for layer in range(2):
        _assert_optimal(cost[layer], n, out[layer], f"layer {layer}")


def test_assignment_padding_zero_targets_and_invalid(emu):
    gen = torch.Generator().manual_seed(12)
    B, Q, T = 4, 20, 12
    n = torch.tensor([0, 3, 12, 5])
    cost = make_costs("uniform", (B, Q, T), n, gen)
    pad = ~(torch.arange(T)[None, :] < n[:, None])[:, None, :].expand(B, Q, T)
    for fill in (-1e9, float("nan"), float("-inf")):
        out = check_assignment(emu.linear_assignment(cost.masked_fill(pad, fill), n, 0))
        for b in range(B):
            assert ((out[b] < n[b]) | (out[b] == -1)).all() and (out[b] >= 0).sum() == n[b]
        assert (out[0] == -1).all()
    bad = cost.clone()
    bad[1, 7, 2] = float("nan")  # a real target's cost: that problem is marked -2, the others are solved
    out = emu.linear_assignment(bad, n, 0)
    assert (out[1] == -2).all() and (out[0] == -1).all() and (out[2] >= 0).sum() == 12
    with pytest.raises(ValueError, match="NaN or infinite"):
        check_assignment(out)
    out = emu.linear_assignment(cost, torch.tensor([0, 3, 13, -1]), 0)  # num_targets outside [0, T]
    assert (out[2] == -2).all() and (out[3] == -2).all() and (out[1] >= 0).sum() == 3


# ---- matching_cost and box_loss ----------------------------------------------------------------------------------

BOX_CASES = [c for c in cases("matching_cost") + cases("box_loss") if "bench" not in c.tags]


@pytest.mark.parametrize("case", BOX_CASES, ids=lambda c: f"{c.op}-{c.name}")
def test_box_kernels_registry_cases(emu, case):
    """The validation cases of `detr-fast validate` (odd sizes, every degenerate box kind, padding, stacked layers,
    every dtype) through the emulated kernels, each checked by its own rule."""
    for dtype in case.dtypes:
        args, kwargs = case.make(torch.device("cpu"), dtype, torch.Generator().manual_seed(len(case.name)))
        err, tol = case.check(getattr(emu, case.op)(*args, **kwargs), args, kwargs, dtype)
        assert err <= tol, f"{dtype}: error {err:.3g} > tolerance {tol:.3g}"


@pytest.mark.parametrize("n", (1, 97, 1025))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_box_loss_backward_equals_cpu_kernel(emu, n, dtype):
    """The fused backward on every degenerate kind, with a strided (expanded) incoming gradient, against the CPU
    kernel (the same box_math.h functions, tested against the reference's autograd in test_box_ops.py)."""
    gen = torch.Generator().manual_seed(n)
    pred, target = box_pairs(gen, n, True)
    pred, target = pred.to(dtype), target.to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g1 = torch.randn(n, generator=gen, dtype=acc)
    gg = torch.randn(1, generator=gen, dtype=acc).expand(n)  # stride 0
    got = emu.box_loss_backward(g1, gg, pred, target)
    want = torch.ops.detr_fast.box_loss_backward(g1, gg, pred, target)
    assert got.dtype == dtype and got.shape == (n, 4)
    scale = 1 + want.double().abs().amax(-1, keepdim=True)  # degenerate pairs reach ~1e6
    assert ((got.double() - want.double()) / scale).abs().max().item() <= (1e-12 if dtype == torch.float64 else 1e-6)


# ---- attention ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def attention_emu():
    return run_attention.build()


@pytest.mark.parametrize("case", run_attention.CASES, ids=run_attention.label)
def test_attention_kernels_match_reference(attention_emu, case):
    """Forward (output, log-sum-exp) and backward (dq, dk, dv) against the fp64 reference given the kernel's own
    dropout mask; outputs and gradients laid out [B, L, H, D] as the CUDA entry points allocate them."""
    assert run_attention.run_case(attention_emu, *case)


def test_attention_empty_inputs_and_unsupported(attention_emu):
    """No query: no block runs, and the host writes rng_state itself. Head dims other than 32 / 64 are refused (the
    Python op runs the reference for them)."""
    q, kv = torch.empty(1, 2, 0, 32), torch.randn(1, 2, 5, 32)
    out, lse, rng, _ = attention_emu.forward(q, kv, kv, None, 0.3, 9, 4)
    assert out.shape == (1, 2, 0, 32) and lse.shape == (1, 2, 0) and rng.tolist() == [9, 4]
    x = torch.randn(1, 1, 4, 48)
    with pytest.raises(ValueError, match="head dim must be 32 or 64"):
        attention_emu.forward(x, x, x, None, 0.0, 0, 0)


def test_attention_saved_flags_switch_and_bad_state(attention_emu, monkeypatch):
    """DETR_FAST_ATTN_KEEP_BITS=0 keeps rng_state at (seed, offset) and gives the same output and gradients as
    saving the flags; the forward's size of rng_state agrees with ops.attention.rng_state_numel (the fake's); a
    backward given an rng_state of any other length is refused."""
    from detr_fast.ops.attention import rng_state_numel
    gen = torch.Generator().manual_seed(11)
    B, H, Lq, Lk, D, p = 2, 2, 67, 131, 32, 0.2
    q, go = (torch.randn(B, H, Lq, D, generator=gen).bfloat16() for _ in range(2))
    k, v = (torch.randn(B, H, Lk, D, generator=gen).bfloat16() for _ in range(2))
    mask = torch.arange(Lk)[None, :] >= torch.tensor([[100], [131]])
    runs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("DETR_FAST_ATTN_KEEP_BITS", flag)
        out, lse, rng, out_acc = attention_emu.forward(q, k, v, mask, p, 5, 8)
        # the fake's length for the same inputs on a GPU (the emulator's tensors are CPU ones)
        on_gpu = [types.SimpleNamespace(shape=t.shape, dtype=t.dtype, device=torch.device("cuda")) for t in (q, k)]
        assert rng.numel() == rng_state_numel(*on_gpu, p)
        runs.append((out, rng, attention_emu.backward(go, q, k, v, out_acc, lse, mask, p, rng)))
    (out1, rng1, g1), (out0, rng0, g0) = runs
    assert rng1.numel() == 2 + B * H * Lq * 3 and rng0.tolist() == [5, 8] and torch.equal(rng1[:2], rng0)
    assert torch.equal(out1, out0) and all(torch.equal(a, b) for a, b in zip(g1, g0))
    with pytest.raises(ValueError, match="rng_state"):
        attention_emu.backward(go, q, k, v, out_acc, lse, mask, p, rng1[:-1])


# ---- races within a block ----------------------------------------------------------------------------------------

@pytest.mark.skipif(race_check.tsan_runtime() is None, reason="no ThreadSanitizer runtime (libtsan) for c++")
def test_kernels_have_no_data_races_within_a_block():
    """race_check.py: a deliberately racing kernel must be reported, then every kernel above runs with no report."""
    proc = subprocess.run([sys.executable, race_check.__file__], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "race check passed" in proc.stdout
