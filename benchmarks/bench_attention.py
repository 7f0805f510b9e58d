"""Attention benchmark: detr_fast.ops.attention against nn.MultiheadAttention's core and every SDPA backend.

    python benchmarks/bench_attention.py [--device cuda] [--iters 20] [--json out.json]

On CUDA it times the registry's "bench" cases of attention (DETR's encoder self-, decoder self- and cross-attention,
with and without padding masks, fp32 and bf16); on the CPU a few small shapes. Each row: forward, or forward +
backward (gradients of q, k, v from out.float().sum()), median milliseconds of:
  ours            detr_fast.ops.attention
  ours_drop       the same with dropout_p = 0.1 (DETR's training setting)
  mha_core        reference.attention: the math of F.multi_head_attention_forward between the projections
                  (scores, masked softmax, weighted sum), in the row's dtype
  mha_core_tf32   the same on fp32 copies with TF32 matmuls (how nn.MultiheadAttention runs in an fp32 model)
  sdpa_<backend>  F.scaled_dot_product_attention under torch.nn.attention.sdpa_kernel(<backend>) with the padding
                  mask as a boolean attn_mask; "-" where the backend refuses the case
The device and the versions come first, the table last. Nothing here asserts a time.
"""
import argparse
import contextlib
import json
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detr_fast.bench import environment, format_table, median_ms  # noqa: E402
from detr_fast.ops import attention, reference  # noqa: E402
from detr_fast.ops.cases_attention import make_inputs  # noqa: E402
from detr_fast.ops.registry import cases  # noqa: E402

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH",
                 "cudnn": "CUDNN_ATTENTION"}


def sdpa_fns() -> dict:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch
        return {}
    fns = {}
    for short, name in SDPA_BACKENDS.items():
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue

        def fn(q, k, v, mask, backend=backend):
            attn_mask = None if mask is None else ~mask[:, None, None, :]  # SDPA: True = may attend
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        fns[f"sdpa_{short}"] = fn
    return fns


@contextlib.contextmanager
def tf32(enabled: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def timed(fn, q, k, v, mask, backward: bool, device: str, iters: int, dtype=None, allow_tf32=False):
    """Median ms of fn(q, k, v, mask) (and its backward), or None when fn refuses the inputs."""
    if dtype is not None:
        q, k, v = (t.to(dtype) for t in (q, k, v))
    leaves = [t.detach().clone().requires_grad_(backward) for t in (q, k, v)]

    def run():
        if backward:
            for t in leaves:
                t.grad = None
            fn(*leaves, mask).float().sum().backward()
        else:
            with torch.no_grad():
                fn(*leaves, mask)

    with tf32(allow_tf32):
        try:
            run()
        except RuntimeError:  # e.g. an SDPA backend that does not take this mask, dtype or shape
            return None
        return median_ms(run, device, iters=iters)


def bench_inputs(device: str):
    """[(name, dtype, (q, k, v, mask))]: the registry's bench cases on CUDA, small shapes on the CPU."""
    out = []
    if device == "cuda":
        for case in cases(op="attention", device="cuda", tag="bench"):
            for dtype in case.dtypes:
                args, _ = case.make(torch.device(device), dtype, torch.Generator().manual_seed(0))
                out.append((case.name, dtype, args))
    else:
        for name, B, Lq, Lk, masked in (("enc self B=2 L=128", 2, 128, 128, True), ("cross B=2 100x128", 2, 100, 128,
                                                                                   True)):
            for dtype in (torch.float32, torch.bfloat16):
                gen = torch.Generator().manual_seed(0)
                lengths = [Lk, Lk // 2] if masked else None
                out.append((f"{name}{' mask' if masked else ''}", dtype,
                            make_inputs(B, 8, Lq, Lk, 32, device, dtype, gen, lengths)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    dev = a.device
    warnings.filterwarnings("ignore", category=UserWarning)  # SDPA explains each refusal in a warning
    print(environment(dev), flush=True)
    sdpa = sdpa_fns()
    rows = []
    for name, dtype, (q, k, v, mask) in bench_inputs(dev):
        for backward in (False, True):
            row = {"case": name, "dtype": str(dtype).replace("torch.", ""), "pass": "fwd+bwd" if backward else "fwd"}
            row["ours_ms"] = timed(attention, q, k, v, mask, backward, dev, a.iters)
            row["ours_drop_ms"] = timed(lambda *t: attention(*t, dropout_p=0.1), q, k, v, mask, backward, dev,
                                        a.iters)
            row["mha_core_ms"] = timed(reference.attention, q, k, v, mask, backward, dev, a.iters)
            if dev == "cuda":
                row["mha_core_tf32_ms"] = timed(reference.attention, q, k, v, mask, backward, dev, a.iters,
                                                dtype=torch.float32, allow_tf32=True)
            for key, fn in sdpa.items():
                row[f"{key}_ms"] = timed(fn, q, k, v, mask, backward, dev, a.iters)
            ours = row["ours_ms"]
            sdpa_times = [row[f"{key}_ms"] for key in sdpa if row.get(f"{key}_ms") is not None]
            if ours:
                row["vs_mha"] = row["mha_core_ms"] / ours if row["mha_core_ms"] else None
                if row.get("mha_core_tf32_ms"):
                    row["vs_mha_tf32"] = row["mha_core_tf32_ms"] / ours
                if sdpa_times:
                    row["vs_best_sdpa"] = min(sdpa_times) / ours
            rows.append(row)
            print(f"  {name} {row['dtype']} {row['pass']}: ours {ours}", flush=True)
    columns = ["case", "dtype", "pass", "ours_ms", "ours_drop_ms", "mha_core_ms", "mha_core_tf32_ms"]
    columns += [f"{key}_ms" for key in sdpa] + ["vs_mha", "vs_mha_tf32", "vs_best_sdpa"]
    print(format_table(rows, columns))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"environment": environment(dev), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
