"""Validation cases of max_pool2d_nhwc and space_to_depth. max_pool2d_nhwc: the ResNet stem's 3x3 / 2 pool (padding 1) on channels_last activations, with
channel counts on and off the 16-byte vector width, odd sizes, and windows holding NaN and -inf; the output must
equal torch's max_pool2d bit for bit (error = number of differing elements, NaN equal to NaN; tolerance 0).
space_to_depth: the ResNet stem's input (3 channels, kernel 7, padding 3, 16 output channels) and odd shapes, from
channels_last and contiguous inputs, cast to the output dtype on the way; it must equal reference.space_to_depth bit
for bit (a copy and a cast)."""
from __future__ import annotations

import torch

from detr_fast.ops.registry import Case, register


def make_input(shape, device, dtype, gen, specials=True):
    x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    if specials and x.numel() > 8:
        flat = x.view(-1)
        idx = torch.randint(0, flat.numel(), (4,), generator=gen)
        flat[idx[:2]] = float("nan")
        flat[idx[2:]] = float("-inf")
    return x.contiguous(memory_format=torch.channels_last).to(device)


def mismatches(out: torch.Tensor, x: torch.Tensor, kernel, stride, padding) -> float:
    # a validation check (tests, `validate`), never in a training step; torch's CPU pool is the oracle
    want = torch.nn.functional.max_pool2d(x.cpu(), kernel, stride, padding)  # sync: validation only
    got = out.cpu()  # sync: validation only
    if got.shape != want.shape or not got.is_contiguous(memory_format=torch.channels_last):
        return float("inf")
    same = (got == want) | (got.isnan() & want.isnan())
    return float((~same).sum())


def _case(name, shape, kernel=(3, 3), stride=(2, 2), padding=(1, 1),
          dtypes=(torch.bfloat16, torch.float16, torch.float32, torch.float64), tags=(), devices=("cpu", "cuda")):
    def make(device, dtype, gen):
        return (make_input(shape, device, dtype, gen), kernel, stride, padding), {}

    def check(out, args, kwargs, dtype):
        return mismatches(out, *args), 0.0

    return register(Case(op="max_pool2d_nhwc", name=name, make=make, check=check, dtypes=dtypes, tags=tags,
                         devices=devices))


_case("stem 2x64x50x67", (2, 64, 50, 67))
_case("odd C=5 3x5x17x9", (3, 5, 17, 9))
_case("C=24 1x24x8x8 k2 s2 p0", (1, 24, 8, 8), (2, 2), (2, 2), (0, 0))
_case("tiny 1x8x1x1", (1, 8, 1, 1))

# Benchmark: the ResNet-50 stem's pool in DETR's step (batch 8 padded to 800x1333, bf16 channels_last); the reference
# is torch's max_pool2d on the same tensor
_case("stem 8x64x400x667", (8, 64, 400, 667), dtypes=(torch.bfloat16,), tags=("bench",), devices=("cuda",))


def _s2d_case(name, shape, kernel=7, padding=(3, 3), channels=16, channels_last=True, out_dtype=None,
              dtypes=(torch.bfloat16, torch.float16, torch.float32, torch.float64), tags=(), devices=("cpu", "cuda")):
    from detr_fast.ops import reference

    def make(device, dtype, gen):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (x.to(device), kernel, padding, channels, out_dtype or dtype), {}

    def check(out, args, kwargs, dtype):
        x = args[0].cpu()  # sync: validation only
        want = reference.space_to_depth(x, *args[1:])
        got = out.cpu()  # sync: validation only
        if got.shape != want.shape or got.dtype != want.dtype or not got.is_contiguous(
                memory_format=torch.channels_last):
            return float("inf"), 0.0
        return float((got != want).sum()), 0.0

    return register(Case(op="space_to_depth", name=name, make=make, check=check, dtypes=dtypes, tags=tags,
                         devices=devices))


_s2d_case("stem 2x3x37x53", (2, 3, 37, 53))
_s2d_case("stem NCHW fp32 in, bf16 out 1x3x20x17", (1, 3, 20, 17), channels_last=False, out_dtype=torch.bfloat16,
          dtypes=(torch.float32,))
_s2d_case("odd C=5 k3 p(1,0) 24 ch 2x5x9x8", (2, 5, 9, 8), kernel=3, padding=(1, 0), channels=24)
_s2d_case("12 ch (element path) 1x3x11x9", (1, 3, 11, 9), channels=12)

# Benchmark: the ResNet-50 stem's input in DETR's step (batch 8 padded to 800x1333, bf16 channels_last); the reference
# is the torch path of model.stem_space_to_depth (a zero fill and four strided copies)
_s2d_case("stem 8x3x800x1333", (8, 3, 800, 1333), dtypes=(torch.bfloat16,), tags=("bench",), devices=("cuda",))
