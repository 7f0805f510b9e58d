"""detr_fast.ops.max_pool2d_nhwc: a max pool of a channels_last tensor, forward only; and space_to_depth, the input of
the stem convolution rewritten as a stride-1 one (model.stem_space_to_depth; see its function).

    out = max_pool2d_nhwc(x, kernel=(3, 3), stride=(2, 2), padding=(1, 1))    x [N, C, H, W] channels_last

The ResNet stem's 3x3 / 2 max pool runs on the trunk's largest activation (DETR-R50's batch: [8, 64, 400, 667] in
bf16). torch's kernel for channels_last input stood out in the graphed step's profile on an H200 (benchmarks/
RESULTS.md); this one reads each window pixel's channels as 16-byte vectors, so the input crosses DRAM about once.
The result is torch's max_pool2d bit for bit (a maximum is exact; a NaN in the window gives NaN, as torch's does).

Forward only: where the stem is frozen (DETR trains layers 2-4) nothing flows back through it. MaxPoolNHWC (the
module models use) calls torch's max_pool2d instead whenever a gradient is needed, the input is not channels_last,
the sizes are not the op's (dilation 1, floor mode), or no kernel was built for the device.

Backends: the CUDA kernel, the C++ CPU kernel, and reference.max_pool2d_nhwc when the extension is not built.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from detr_fast.ops import reference
from detr_fast.ops._ext import extension_loaded, has_kernel, warn_fallback

_HAS_KERNEL = {dev: has_kernel("max_pool2d_nhwc", dev) for dev in ("cpu", "cuda")}
_HAS_S2D = {dev: has_kernel("space_to_depth", dev) for dev in ("cpu", "cuda")}


def _pair(v) -> list:
    return [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]


def max_pool2d_nhwc(x: torch.Tensor, kernel=3, stride=2, padding=1) -> torch.Tensor:
    """max_pool2d of a channels_last x [N, C, H, W] -> [N, C, Ho, Wo] channels_last (see the module docstring)."""
    k, s, p = _pair(kernel), _pair(stride), _pair(padding)
    if not _HAS_KERNEL.get(x.device.type, False):
        if x.device.type in ("cpu", "cuda"):
            warn_fallback("max_pool2d_nhwc", f"no max_pool2d_nhwc kernel built for device {x.device.type}")
        return reference.max_pool2d_nhwc(x, k, s, p)
    return torch.ops.detr_fast.max_pool2d_nhwc(x, k, s, p)


def space_to_depth(x: torch.Tensor, kernel: int, padding, channels: int, dtype: torch.dtype) -> torch.Tensor:
    """The space-to-depth input S [B, channels, Hs, Ws] (channels_last, dtype) of a stride-2 convolution of x
    [B, C, H, W] (any strides) with an odd kernel and padding: S[b, 4c + 2r + s, Y, X] = x[b, c, 2Y + r - ph,
    2X + s - pw], zero outside x and in channels 4C and up (reference.space_to_depth). One pass: each output pixel's
    channels gathered and written as 16-byte vectors. The frozen stem of model.stem_space_to_depth; forward only."""
    p = _pair(padding)
    if not _HAS_S2D.get(x.device.type, False):
        if x.device.type in ("cpu", "cuda"):
            warn_fallback("space_to_depth", f"no space_to_depth kernel built for device {x.device.type}")
        return reference.space_to_depth(x, int(kernel), p, int(channels), dtype)
    return torch.ops.detr_fast.space_to_depth(x, int(kernel), p, int(channels), dtype)


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


class MaxPoolNHWC(nn.Module):
    """nn.MaxPool2d (dilation 1, floor mode) whose forward takes max_pool2d_nhwc where it applies (a channels_last
    input that needs no gradient, a kernel built for its device, outside torch.compile), torch's max_pool2d
    elsewhere: the same values either way. Has no parameters: a model's state dict is unchanged."""

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        if pool.dilation not in (1, (1, 1)) or pool.ceil_mode or pool.return_indices:
            raise ValueError("MaxPoolNHWC replaces max pools with dilation 1, floor mode and no indices")
        self.kernel_size, self.stride, self.padding = pool.kernel_size, pool.stride or pool.kernel_size, pool.padding

    def forward(self, x):
        if (_channels_last(x) and _HAS_KERNEL.get(x.device.type, False) and not torch.compiler.is_compiling()
                and not (torch.is_grad_enabled() and x.requires_grad)):
            return torch.ops.detr_fast.max_pool2d_nhwc(x, _pair(self.kernel_size), _pair(self.stride),
                                                       _pair(self.padding))
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


def _register() -> None:
    @torch.library.register_fake("detr_fast::max_pool2d_nhwc")
    def _fake(x, kernel, stride, padding):
        torch._check(x.dim() == 4, lambda: "max_pool2d_nhwc: x must be [N, C, H, W]")
        ho = (x.shape[2] + 2 * padding[0] - kernel[0]) // stride[0] + 1
        wo = (x.shape[3] + 2 * padding[1] - kernel[1]) // stride[1] + 1
        return x.new_empty((x.shape[0], x.shape[1], ho, wo)).contiguous(memory_format=torch.channels_last)


def _register_s2d() -> None:
    @torch.library.register_fake("detr_fast::space_to_depth")
    def _fake(x, kernel, padding, channels, dtype):
        torch._check(x.dim() == 4, lambda: "space_to_depth: x must be [B, C, H, W]")
        half = (kernel + 1) // 2
        hs = (x.shape[2] + 2 * padding[0] - kernel) // 2 + half
        ws = (x.shape[3] + 2 * padding[1] - kernel) // 2 + half
        return x.new_empty((x.shape[0], channels, hs, ws), dtype=dtype).contiguous(memory_format=torch.channels_last)


if extension_loaded() and hasattr(torch.ops.detr_fast, "max_pool2d_nhwc"):
    _register()
if extension_loaded() and hasattr(torch.ops.detr_fast, "space_to_depth"):
    _register_s2d()
