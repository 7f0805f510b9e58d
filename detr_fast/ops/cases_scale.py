"""Validation cases of scale_many: the trunk's trainable convolution weights (ResNet-50 layers 2-4 shapes,
channels_last) folded forward (fp32 -> the low precision) and their gradients back (low precision -> fp32), and odd
sizes; each output must equal reference.scale_many bit for bit (error = the largest difference, tolerance 0)."""
from __future__ import annotations

import torch

from detr_fast.ops import reference
from detr_fast.ops.registry import Case, register

# (C_out, C_in, k) of the trainable convolutions of one ResNet-50 bottleneck of each stage, and odd ones
TRUNK = [(128, 256, 1), (128, 128, 3), (512, 128, 1), (256, 512, 1), (256, 256, 3), (1024, 256, 1), (512, 1024, 1),
         (512, 512, 3), (2048, 512, 1)]
ODD = [(7, 3, 3), (1, 1, 1), (33, 5, 1), (0, 4, 3), (9, 0, 1)]


def resnet50_trainable_convs() -> list:
    """(C_out, C_in, k) of the 42 convolutions of ResNet-50's layers 2-4 (the trunk DETR trains), in order."""
    out, c_in = [], 256
    for blocks, width in ((4, 128), (6, 256), (3, 512)):
        for b in range(blocks):
            out += [(width, c_in if b == 0 else 4 * width, 1), (width, width, 3), (4 * width, width, 1)]
            if b == 0:
                out.append((4 * width, c_in, 1))  # the downsample
        c_in = 4 * width
    return out


def _case(name, shapes, backward, dtypes=(torch.bfloat16, torch.float16, torch.float32), tags=(),
          devices=("cpu", "cuda")):
    def make(device, dtype, gen):
        in_dtype, out_dtype = (dtype, torch.float32) if backward else (torch.float32, dtype)
        xs = [torch.randn(c, k_in, k, k, generator=gen, dtype=torch.float64).to(in_dtype)
              .contiguous(memory_format=torch.channels_last).to(device) for c, k_in, k in shapes]
        scale = (torch.rand(sum(s[0] for s in shapes), generator=gen, dtype=torch.float64) + 0.25).float().to(device)
        return (xs, scale, out_dtype), {}

    def check(out, args, kwargs, dtype):
        want = reference.scale_many(*args)
        err = 0.0
        for o, w in zip(out, want):
            if o.shape != w.shape or o.dtype != w.dtype or o.stride() != w.stride():
                return float("inf"), 0.0
            if o.numel():
                err = max(err, float((o.double() - w.double()).abs().max()))
        return err, 0.0

    return register(Case(op="scale_many", name=name, make=make, check=check, dtypes=dtypes, tags=tags,
                         devices=devices))


_case("trunk weights fold", TRUNK, backward=False)
_case("trunk gradients back", TRUNK, backward=True)
_case("odd sizes fold", ODD, backward=False)
_case("odd sizes back", ODD, backward=True)

# Benchmark: what TrunkFold does per step for DETR-R50 under bf16 autocast, all 42 trainable weights (23.2 M
# elements) each way; the reference is one product per weight, the path it replaces
_case("R50 layers 2-4 fold", resnet50_trainable_convs(), backward=False, dtypes=(torch.bfloat16,), tags=("bench",),
      devices=("cuda",))
_case("R50 layers 2-4 grads back", resnet50_trainable_convs(), backward=True, dtypes=(torch.bfloat16,),
      tags=("bench",), devices=("cuda",))
