"""Fold FrozenBatchNorm2d into the preceding convolution.

A frozen BatchNorm is an affine map per channel, y = x * s + t with s = weight / sqrt(var + eps) and
t = bias - mean * s. After a convolution it folds exactly into the convolution: conv(x, W) * s + t =
conv(x, W * s[:, None, None, None]) + t. The folded weight is recomputed from W on every forward (a tiny op on the
weights), so W keeps training and its gradient is unchanged, while the per-activation multiply and add over every
backbone feature map disappear. State-dict keys and values stay those of the unfolded model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d


class FoldedConv2d(nn.Module):
    """A Conv2d followed by a FrozenBatchNorm2d, computed as one convolution with bias.

    Holds the original conv as `conv` only through its parameters: the state-dict key stays `<name>.weight`."""

    def __init__(self, conv: nn.Conv2d, bn: FrozenBatchNorm2d):
        super().__init__()
        if conv.bias is not None:
            raise ValueError("folding expects a bias-free convolution")
        self.weight = conv.weight
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        object.__setattr__(self, "_bn", bn)  # not a submodule: its buffers stay under the BN's own name

    def forward(self, x):
        bn = self._bn
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()  # [C_out]
        shift = bn.bias - bn.running_mean * scale
        w = self.weight * scale.to(self.weight.dtype)[:, None, None, None]
        return F.conv2d(x, w, shift.to(x.dtype) if x.dtype == w.dtype else shift, self.stride, self.padding,
                        self.dilation, self.groups)


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """Keeps the frozen statistics as buffers (for checkpoints); the convolution before it applies them."""

    def forward(self, x):
        return x


def _as_folded_bn(bn: FrozenBatchNorm2d) -> FoldedFrozenBatchNorm2d:
    new = FoldedFrozenBatchNorm2d(bn.weight.shape[0], eps=bn.eps).to(device=bn.weight.device, dtype=bn.weight.dtype)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(new, name).copy_(getattr(bn, name))
    return new


def fold_frozen_bn(module: nn.Module) -> int:
    """Fold every (Conv2d, FrozenBatchNorm2d) pair of a torchvision ResNet trunk in place; returns how many.

    Pairs are found by name inside each block: conv1/bn1, conv2/bn2, conv3/bn3 and downsample.0/downsample.1.
    """
    count = 0
    for parent in list(module.modules()):
        children = dict(parent.named_children())
        pairs = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3)] + [("0", "1")]
        for cname, bname in pairs:
            conv, bn = children.get(cname), children.get(bname)
            if isinstance(conv, nn.Conv2d) and type(bn) is FrozenBatchNorm2d:
                bn_new = _as_folded_bn(bn)
                setattr(parent, bname, bn_new)
                setattr(parent, cname, FoldedConv2d(conv, bn_new))
                count += 1
    return count
