"""Run the CUDA attention kernels on the CPU through the host emulator and compare them with reference.attention.

    PYTHONPATH=. python tests/emulator/run_attention.py [--quick]

Builds attention_emulator.cpp (the kernels of csrc/attention/attention_kernels*.cuh and the ops' host side,
attention_launch.cuh, compiled for the host, lanes as fibers) with torch.utils.cpp_extension and checks forward and
backward of the fp32, fp16 and bf16 kernels for head dims 32 and 64, odd lengths, per-image padding, fully padded
images and dropout (the keep mask from the CPU op attention_dropout_mask, which the emulated mask kernel must equal),
and that outputs and gradients come back laid out [B, L, H, D]. Errors follow the test rule: fp32 within 1e-5 of
the fp64 reference (relative to the tensor's scale), fp16/bf16 within twice the error of the reference computed in
that precision. The same cases run in the test suite (tests/test_cuda_emulated.py).
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from detr_fast.ops import reference  # noqa: E402
from detr_fast.ops.attention import dropout_mask  # noqa: E402
from detr_fast.ops.cases_attention import compare  # noqa: E402

sys.path.insert(0, HERE)
from build import build as build_emulator  # noqa: E402


def build(sanitize=None):
    return build_emulator("detr_fast_attention_emulator", "attention_emulator.cpp", ["attention"], sanitize=sanitize)


def run_case(emu, B, H, Lq, Lk, D, dtype, masked, p, seed=1234, offset=8, strided=False):
    g = torch.Generator().manual_seed(B * 1000 + Lq * 10 + Lk + D)
    q = torch.randn(B, H, Lq, D, generator=g)
    k = torch.randn(B, H, Lk, D, generator=g)
    v = torch.randn(B, H, Lk, D, generator=g)
    go = torch.randn(B, H, Lq, D, generator=g)
    mask = None
    if masked:
        lens = torch.randint(1, Lk + 1, (B,), generator=g)
        lens[0] = min(lens[0].item(), 70)  # key tiles past the first 64 + 6 keys are fully padded
        mask = torch.arange(Lk)[None, :] >= lens[:, None]
        if B > 1:
            mask[-1] = True  # one fully padded image
    ql, kl, vl, gol = (t.to(dtype) for t in (q, k, v, go))
    if strided == "misaligned":  # off a 16-byte boundary: the host side copies them before the vector loads
        ql, kl, vl, gol = (torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape) for t in (ql, kl, vl, gol))
        assert ql.data_ptr() % 16 != 0
    elif strided:  # q, k, v as head views of [B, L, H, D] tensors (DETR's projection layout)
        ql, kl, vl = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (ql, kl, vl))
        assert not ql.is_contiguous()
    out, lse, rng, out_acc = emu.forward(ql, kl, vl, mask, p, seed, offset)
    dq, dk, dv = emu.backward(gol, ql, kl, vl, out_acc, lse, mask, p, rng)
    keep = None
    if p > 0:
        keep = dropout_mask(rng, B, H, Lq, Lk, p)  # the CPU kernel's
        if not torch.equal(emu.dropout_mask(rng, B, H, Lq, Lk, p), keep):
            print(f"FAIL dropout mask kernel differs from the CPU kernel's (B={B} H={H} Lq={Lq} Lk={Lk})")
            return False
    if not all(t.transpose(1, 2).is_contiguous() for t in (out, dq, dk, dv)):
        print("FAIL outputs and gradients are not laid out [B, L, H, D]")
        return False
    assert rng[:2].tolist() == ([seed, offset] if p > 0 else [0, 0]), rng[:2]
    if not check_saved_flags(emu, rng, keep, mask, (gol, ql, kl, vl, out_acc, lse, mask, p), (dq, dk, dv), dtype):
        return False

    def ref(dt):
        ts = [t.to(dt).requires_grad_(True) for t in (q, k, v)]
        o = reference.attention(*ts, mask, p, dropout_mask=keep)
        grads = torch.autograd.grad(o, ts, go.to(dt))
        return [o.detach(), *grads]

    r64 = ref(torch.float64)
    got = [out, dq, dk, dv]
    rlow = ref(dtype) if dtype != torch.float32 else None
    rows = []
    ok = True
    for name, a, b, i in zip(("out", "dq", "dk", "dv"), got, r64, range(4)):
        err, tol = compare(a, b, rlow[i] if rlow else None, dtype)
        ok = ok and err <= tol
        rows.append(f"{name} {err:.2e}/{tol:.2e}")
    # lse against the fp64 log-sum-exp (padded keys excluded; fully padded queries -inf)
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * D ** -0.5
    if mask is not None:
        s = s.masked_fill(mask[:, None, None, :], float("-inf"))
    lse_ref = torch.logsumexp(s, -1)
    fin = torch.isfinite(lse_ref)
    lse_ok = bool((torch.isfinite(lse) == fin).all()) and (lse[fin].double() - lse_ref[fin]).abs().max().item() < 2e-2
    ok = ok and lse_ok
    label = f"B={B} H={H} Lq={Lq} Lk={Lk} D={D} {str(dtype)[6:]} mask={masked} p={p} strided={strided}"
    print(("PASS " if ok else "FAIL ") + label + " | " + " ".join(rows) + f" | lse {'ok' if lse_ok else 'BAD'}",
          flush=True)
    return ok


def saved_words(keep: torch.Tensor) -> torch.Tensor:
    """The 16-bit words the tensor-core forward saves for a keep mask [B, H, Lq, Lk] (attention_common.h's layout):
    [B, H, Lq, tiles, 4], word t of a 64-key tile holding key 8 n + 2 t + e at bit 2 n + e."""
    B, H, Lq, Lk = keep.shape
    tiles = (Lk + 63) // 64
    k = torch.zeros(B, H, Lq, tiles * 64, dtype=torch.int32)
    k[..., :Lk] = keep.to(torch.int32)
    k = k.view(B, H, Lq, tiles, 8, 4, 2).permute(0, 1, 2, 3, 5, 4, 6).reshape(B, H, Lq, tiles, 4, 16)
    return (k << torch.arange(16, dtype=torch.int32)).sum(-1, dtype=torch.int32)


def check_saved_flags(emu, rng, keep, mask, bwd_args, grads, dtype) -> bool:
    """Where the tensor-core forward ran with dropout: rng_state carries its keep flags after (seed, offset), equal to
    the keep mask in every tile the kernels visit, and the backward that reads them returns the gradients of the one
    that draws them again from rng_state[:2], bit for bit. Elsewhere rng_state is (seed, offset) alone."""
    go, q, k, v, out_acc, lse, mask_, p = bwd_args
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    tiles = (Lk + 63) // 64
    if keep is None or dtype == torch.float32:
        if rng.numel() != 2:
            print(f"FAIL rng_state has {rng.numel()} elements where no flags are saved")
            return False
        return True
    if rng.numel() != 2 + B * H * Lq * tiles:
        print(f"FAIL rng_state has {rng.numel()} elements, expected 2 + {B * H * Lq * tiles}")
        return False
    words = (rng[2:].view(torch.int16).to(torch.int32) & 0xFFFF).view(B, H, Lq, tiles, 4)
    visited = torch.ones(B, tiles, dtype=torch.bool)  # tiles with an unpadded key: the forward writes them
    if mask is not None:
        unpadded = torch.zeros(B, tiles * 64, dtype=torch.bool)
        unpadded[:, :Lk] = ~mask
        visited = unpadded.view(B, tiles, 64).any(-1)
    sel = visited[:, None, None, :, None].expand_as(words)
    in_range = saved_words(torch.ones_like(keep))  # the flags of keys past Lk are drawn but never read
    if not torch.equal((words & in_range)[sel], saved_words(keep)[sel]):
        print("FAIL the saved dropout flags differ from the keep mask")
        return False
    again = emu.backward(go, q, k, v, out_acc, lse, mask_, p, rng[:2].clone())
    if not all(torch.equal(a, b) for a, b in zip(grads, again)):
        print("FAIL the backward reading the saved flags differs from the one drawing them again")
        return False
    return True


# (B, H, Lq, Lk, D, dtype, masked, p[, seed, offset, strided]): both head dims, all three kernels' dtypes, odd
# lengths, key tiles past the first 64 fully padded, a fully padded image, one key, one query, dropout, q, k, v
# as head views of [B, L, H, D] projections, and inputs off a 16-byte boundary.
CASES = [
    (1, 1, 16, 16, 32, torch.bfloat16, False, 0.0),
    (2, 2, 70, 75, 32, torch.bfloat16, True, 0.0),
    (2, 1, 7, 130, 64, torch.float16, True, 0.0),
    (2, 1, 97, 33, 64, torch.bfloat16, True, 0.25),
    (2, 2, 70, 75, 32, torch.float32, True, 0.0),
    (2, 1, 37, 45, 64, torch.float32, True, 0.3),
    (1, 2, 65, 1, 32, torch.float16, False, 0.1),
    (1, 1, 1, 7, 32, torch.float32, False, 0.0),
    (2, 1, 50, 200, 32, torch.bfloat16, True, 0.1),
    (2, 3, 130, 70, 64, torch.float16, True, 0.2, 99, 5, True),
    (2, 3, 40, 70, 32, torch.float32, True, 0.0, 0, 0, True),
    (1, 2, 33, 20, 64, torch.bfloat16, False, 0.2, 7, 4, "misaligned"),
    (2, 1, 9, 12, 32, torch.float32, True, 0.0, 0, 0, "misaligned"),
]


def label(case) -> str:
    B, H, Lq, Lk, D, dtype, masked, p = case[:8]
    layout = {True: "-strided", "misaligned": "-misaligned"}.get(case[10], "") if len(case) > 10 else ""
    return f"B{B}H{H}q{Lq}k{Lk}D{D}-{str(dtype)[6:]}{'-mask' if masked else ''}-p{p}{layout}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    emu = build()
    cases = CASES[:2] if a.quick else CASES
    results = [run_case(emu, *c) for c in cases]
    print(f"{sum(results)}/{len(results)} passed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
