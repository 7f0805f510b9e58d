"""Fold FrozenBatchNorm2d into the preceding convolution, and optionally fuse the folded bias into bias_act.

A frozen BatchNorm is an affine map per channel, y = x * s + t with s = weight / sqrt(var + eps) and
t = bias - mean * s. After a convolution it folds exactly into the convolution: conv(x, W) * s + t =
conv(x, W * s[:, None, None, None]) + t. A trainable W is multiplied by s on every forward (a tiny op on the
weights), so W keeps training and its gradient is unchanged, while the per-activation multiply and add over every
backbone feature map disappear. State-dict keys and values stay those of the unfolded model.

s and t (and, for a frozen W, the folded weight W * s) are cached on the module: the frozen statistics never change
during training, so recomputing them costs a handful of tiny operator launches per convolution per step for
nothing. Under autocast the cached weight and bias are stored already cast to its dtype (the very values autocast's
own cast would give). Each cache entry is keyed on the (data_ptr, _version, device, dtype) of every tensor it was
computed from, all read on the host: load_state_dict (an in-place copy bumps _version), any other in-place write,
.to(), .double() miss it. Only writes through `.data`, which bypass the version counter, would go unseen. The entry
also holds the storages of those tensors, so a freed buffer's address cannot come back under the same key. While
torch.compile traces and while a CUDA graph is captured everything is computed inline: a captured graph reads the
buffers themselves, so an in-place load between replays still reaches it (with model.flat_cast, TrunkFold computes
it for all convolutions at once in a capture). Under autocast a trainable weight is folded and cast by one product
written in the operand dtype (_ScaleCast), and its gradient comes back the same way.

fuse_bias_act (after fold_frozen_bn) goes one step further: a folded convolution still adds its bias in a pass of
its own under eager PyTorch, then the ReLU, and at a residual block's end the residual add and another ReLU, each a
full pass over the activation. The fused blocks run each convolution without bias and apply bias, residual and ReLU
in one detr_fast.ops.bias_act call.

fuse_conv_relu (model.conv_fusion, after fuse_bias_act) goes further still on a GPU: each fused block's
convolution, bias, residual add and ReLU (and the stem's) become one cuDNN call, torch.cudnn_convolution_relu or
cudnn_convolution_add_relu. The activation is then written once, by the convolution, instead of written by it and
read and written again by bias_act. cuDNN adds the bias to the fp32 accumulator before the one rounding to the
activation's dtype, where the unfused path rounds the convolution's output first: the results agree to that
rounding. The two operators have no backward: where no gradient flows (DETR's frozen stem and layer1 in training,
everything under torch.no_grad) they are called as they are; elsewhere _ConvBiasReLU gives them one (the ReLU's mask
from the saved output, then the convolution's own backward: what autograd runs for the unfused path). On the CPU
and while torch.compile traces, the bias_act path runs.

fuse_residual_grad (model.residual_grad_fusion, after fuse_bias_act) shortens the backward at the joints between the
blocks of each ResNet stage. A block's input x, the previous block's ReLU output, feeds two consumers: the first
convolution and the residual (or the downsample). Autograd sums their two gradients in one pass over the activation
and the previous block's backward then masks the sum with its ReLU in another: six passes of reads and writes. In a
ResidualGradChain each inner block's last ReLU leaves its mask to the next block, which forks its input into two
aliases (_ForkReLUGrad) whose backward sums and masks the two gradients in one detr_fast.ops.relu_backward_sum pass:
four. The values are bit-identical. Consecutive stages are joined the same way by the trunk's ChainedLayerGetter where
the first stage's output is not returned as a feature. A stage or block that carries a forward hook (it would see an
unmasked output), and torch.compile's tracing, run the plain path.

stem_space_to_depth (model.stem_space_to_depth) rewrites the stem convolution (7x7, stride 2, padding 3, 3 input
channels), where no gradient flows, as a stride-1 4x4 convolution: with x' the input zero-padded by 3 on top and
left and W8 the weight zero-padded to 8x8, out[y, x] = sum_{i,j<8} W8[i, j] x'[2y + i, 2x + j]; writing i = 2a + r,
j = 2b + s gives sum_{a,b<4} sum_{r,s<2} W8[2a + r, 2b + s] x'[2(y + a) + r, 2(x + b) + s], a stride-1 convolution
of S[(c, r, s)][Y, X] = x'[2Y + r, 2X + s] (12 channels, padded with zeros to 16) with W'[(c, r, s)][a, b] =
W8[c, 2a + r, 2b + s]. The rows and columns S holds beyond those the plain convolution reads meet only W8's zero
row and column. The same products, summed in another order; cuDNN runs K = 256 as an aligned implicit GEMM where
3 channels give it a poor kernel. S of a channels_last input is built in one pass by detr_fast.ops.space_to_depth.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from detr_fast.models.cast import autocast_dtype, channels_last, flatten, unflatten
from detr_fast.ops import bias_act, reference, relu_backward_sum, space_to_depth
from detr_fast.ops.bias_act import bias_grad
from detr_fast.ops.scale import ScaleMany


def _key(t: torch.Tensor) -> tuple:
    """A host-side identity of a tensor's current contents: changes with its memory, any in-place write, device and
    dtype. Reads no device memory."""
    return t.data_ptr(), t._version, t.device, t.dtype


def _capturing(x: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream (x's device)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _may_cache(x: torch.Tensor) -> bool:
    """Host-side caches are bypassed while torch.compile traces and while a CUDA graph is being captured."""
    return not torch.compiler.is_compiling() and not _capturing(x)


class _ScaleCast(torch.autograd.Function):
    """(W, scale [C_out, 1, 1, 1], dtype) -> W * scale written in dtype by one kernel (the product in W's precision,
    rounded once, as W * scale followed by autocast's cast computes it); backward: the gradient times scale written
    in W's dtype, again one kernel (the gradient converted exactly, then the product, as autograd computes it)."""

    @staticmethod
    def forward(ctx, w, scale, dtype):
        out = torch.empty_like(w, dtype=dtype)
        torch.mul(w, scale, out=out)
        ctx.save_for_backward(scale)
        ctx.w_dtype = w.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        (scale,) = ctx.saved_tensors
        gw = torch.empty_like(g, dtype=ctx.w_dtype)
        torch.mul(g, scale, out=gw)
        return gw, None, None


def _fold_trainable(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A trainable W folded with scale, in the convolution's operand dtype: under autocast one kernel each way in
    place of a product and a cast (the same values); otherwise the plain product."""
    scale = scale.to(w.dtype)
    return w * scale if dtype == w.dtype else _ScaleCast.apply(w, scale, dtype)


# model.stem_space_to_depth builds the space-to-depth input of a channels_last x with detr_fast.ops.space_to_depth,
# one pass (True), or, as when it was first timed, with a zero fill and four strided copies (False: kept for
# benchmarks/bench_step.py's comparison; the values are the same bit for bit)
S2D_KERNEL = True


def s2d_fits(weight: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """Whether a convolution is one stem_space_to_depth rewrites: stride (2, 2), dilation 1, groups 1, a square odd
    kernel and explicit padding."""
    k = weight.shape[-1]
    return (weight.dim() == 4 and weight.shape[-2] == k and k % 2 == 1 and tuple(stride) == (2, 2)
            and tuple(dilation) == (1, 1) and groups == 1 and not isinstance(padding, str) and len(padding) == 2)


def _s2d_channels(c: int) -> int:
    """The space-to-depth channel count for c input channels: 4 * c rounded up to a multiple of 8 (16-byte pixels in
    bf16 channels_last)."""
    return -(-4 * c // 8) * 8


def s2d_weight(weight: torch.Tensor, as_channels_last: bool) -> torch.Tensor:
    """W [C_out, C, k, k] (k odd) -> W' [C_out, Cs, k', k'] with W'[o, c * 4 + r * 2 + s, a, b] = W8[o, c, 2a + r,
    2b + s], W8 being W zero-padded to k + 1 on the bottom and right, channels 4C..Cs zero; the kernel that runs a
    stride-2 convolution of x with W as a stride-1 one of space_to_depth(x) with W'."""
    o, c, k, _ = weight.shape
    kh = (k + 1) // 2
    w8 = F.pad(weight, (0, 2 * kh - k, 0, 2 * kh - k))  # [C_out, C, 2k', 2k']: (2a + r, 2b + s)
    w4 = w8.reshape(o, c, kh, 2, kh, 2).permute(0, 1, 3, 5, 2, 4).reshape(o, 4 * c, kh, kh)  # [C_out, (c, r, s), a, b]
    fmt = torch.channels_last if as_channels_last else torch.contiguous_format
    out = torch.empty((o, _s2d_channels(c), kh, kh), dtype=weight.dtype, device=weight.device, memory_format=fmt)
    out[:, 4 * c:].zero_()
    out[:, :4 * c] = w4
    return out


class FoldedConv2d(nn.Module):
    """A Conv2d followed by a FrozenBatchNorm2d, computed as one convolution with bias.

    Holds the original conv as `conv` only through its parameters: the state-dict key stays `<name>.weight`.
    fused_relu (set by fuse_bias_act for the stem): the bias and a ReLU are applied by one bias_act call."""

    def __init__(self, conv: nn.Conv2d, bn: FrozenBatchNorm2d):
        super().__init__()
        if conv.bias is not None:
            raise ValueError("folding expects a bias-free convolution")
        self.weight = conv.weight
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.fused_relu = False
        self.cudnn_fusion = False  # set by fuse_conv_relu: cuDNN's fused conv + bias (+ residual) + ReLU on a GPU
        self.pad_in = 0  # set by pad_stem_channels: input and weight zero-padded to this many input channels
        self.space_to_depth = False  # set by stem_space_to_depth: stride 2 run as stride 1 on a space-to-depth input
        object.__setattr__(self, "_bn", bn)  # not a submodule: its buffers stay under the BN's own name
        self._cache: dict = {}  # name -> (key, value, pinned storages); not a buffer: the state dict is unchanged
        # (folded weight or None, scale [C, 1, 1, 1], shift, shift in the operand dtype or None): lent by TrunkFold
        self._lent = None

    def _apply(self, *args, **kwargs):
        self._cache.clear()  # .to() / .cuda() / .double(): the keys would miss anyway; free the old tensors now
        return super()._apply(*args, **kwargs)

    def _cached(self, name: str, key: tuple, sources: tuple, compute: Callable):
        hit = self._cache.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        # plain tensors even when the first call runs in inference mode: later training steps save them for backward
        with torch.inference_mode(False), torch.no_grad():
            value = compute()
        self._cache[name] = (key, value, [t.untyped_storage() for t in sources])
        return value

    def _scale_shift_now(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale [C_out, 1, 1, 1], shift [C_out]) from the BN buffers."""
        bn = self._bn
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
        return scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale

    def _folded(self, x: torch.Tensor, cast_shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(W * scale, shift) for the convolution of x. cast_shift: shift in the convolution's operand dtype (for
        F.conv2d's bias) rather than the BN's own."""
        if self._lent is not None:  # computed with every other convolution of the trunk (TrunkFold, in a capture)
            weight, scale, shift, shift_low = self._lent
            if weight is None:  # trainable: the gradient reaches W through the product
                weight = _fold_trainable(self.weight, scale, autocast_dtype(x, self.weight))
            return weight, shift_low if cast_shift and shift_low is not None else shift
        bn, w = self._bn, self.weight
        bufs = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
        if not _may_cache(x) or any(t.requires_grad for t in bufs):
            scale, shift = self._scale_shift_now()
            shift = shift.to(x.dtype) if cast_shift and x.dtype == w.dtype else shift
            if w.requires_grad and not torch.compiler.is_compiling() and not scale.requires_grad:  # in a capture
                return _fold_trainable(w, scale, autocast_dtype(x, w)), shift
            return w * scale.to(w.dtype), shift
        bn_key = tuple(_key(t) for t in bufs) + (bn.eps,)
        scale, shift = self._cached("scale_shift", bn_key, bufs, self._scale_shift_now)
        wdt = autocast_dtype(x, w)
        if cast_shift and shift.dtype != wdt:
            shift = self._cached("shift_cast", (bn_key, wdt), bufs, lambda: shift.to(wdt))
        if w.requires_grad:  # recomputed every forward: the gradient reaches W through the product
            return _fold_trainable(w, scale, wdt), shift
        weight = self._cached("weight", (bn_key, _key(w), wdt), bufs + (w,), lambda: (w * scale.to(w.dtype)).to(wdt))
        return weight, shift

    def _padded(self, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (in the convolution's operand dtype) and weight zero-padded along the input channels to self.pad_in
        (pad_stem_channels), where nothing needs a gradient; the added products are zeros, so the convolution is
        the same up to its summation order. Unchanged otherwise."""
        c = x.shape[1]
        if self.pad_in <= c or self.groups != 1 or weight.shape[1] != c or (
                torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            return x, weight
        x = x.to(autocast_dtype(x, self.weight))

        def pad(t):
            fmt = torch.channels_last if channels_last(t) else torch.contiguous_format
            out = torch.empty((t.shape[0], self.pad_in, *t.shape[2:]), dtype=t.dtype, device=t.device,
                              memory_format=fmt)
            out[:, c:].zero_()
            out[:, :c] = t
            return out
        return pad(x), pad(weight)

    def _space_to_depth(self, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(S, W') whose stride-1, unpadded convolution is this stride-2 one (stem_space_to_depth), where it applies
        (s2d_fits, and nothing needs a gradient); None otherwise. S [B, Cs, Ho + k' - 1, Wo + k' - 1] is x's space to
        depth in the convolution's operand dtype and x's layout, W' [C_out, Cs, k', k'] the weight rearranged to
        match (k' = ceil(k / 2), Cs = 4 * C_in rounded up to a multiple of 8). W' is cached, keyed on the folded
        weight it comes from, and computed inline while a CUDA graph is captured (a few tiny ops)."""
        if not self.space_to_depth or x.dim() != 4 or weight.shape[1] != x.shape[1] or not s2d_fits(
                weight, self.stride, self.padding, self.dilation, self.groups) or (
                torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            return None
        k = weight.shape[-1]
        if any(n + 2 * p < k for n, p in zip(x.shape[2:], self.padding)):  # no output: the plain path raises
            return None
        cl = channels_last(x)
        if self._lent is None and _may_cache(x):
            w2 = self._cached("s2d_weight", (_key(weight), cl), (weight,), lambda: s2d_weight(weight, cl))
        else:
            w2 = s2d_weight(weight, cl)
        dtype, cs = autocast_dtype(x, self.weight), _s2d_channels(x.shape[1])
        if cl and S2D_KERNEL:  # our kernel: one pass, 16-byte stores (channels_last output)
            return space_to_depth(x, k, self.padding, cs, dtype), w2
        fmt = torch.channels_last if cl else torch.contiguous_format
        return reference.space_to_depth(x, k, self.padding, cs, dtype, fmt), w2

    def _operands(self, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
        """(input, weight, stride, padding) the convolution runs on: the space-to-depth form where it applies (it
        wins over pad_in), else the channel-padded operands (_padded), else x and weight as they are."""
        s2d = self._space_to_depth(x, weight)
        if s2d is not None:
            return s2d[0], s2d[1], (1, 1), (0, 0)
        x, weight = self._padded(x, weight)
        return x, weight, self.stride, self.padding

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x, weight, stride, padding = self._operands(x, weight)
        return F.conv2d(x, weight, bias, stride, padding, self.dilation, self.groups)

    def conv_nobias(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the folded convolution of x without its bias, the bias [C_out] in the BN's dtype) for a caller that adds
        the bias itself (bias_act accepts a float32 bias with a bf16 activation)."""
        weight, shift = self._folded(x, cast_shift=False)
        return self._conv(x, weight, None), shift

    def uses_cudnn(self, x: torch.Tensor) -> bool:
        """Whether this call takes cuDNN's fused path (fuse_conv_relu): a CUDA input, outside torch.compile."""
        return self.cudnn_fusion and x.is_cuda and not torch.compiler.is_compiling()

    def conv_bias_relu(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                       combine: Callable | None = None, mask_grad: bool = True) -> torch.Tensor:
        """relu(conv(x, W * s) + t (+ residual)): one cuDNN call where uses_cudnn, else the convolution without bias
        and one bias_act pass; combine(t) -> the bias to add instead of t (a downsample's bias joined to it).
        mask_grad=False: the backward takes the gradient of the output as already masked by the ReLU (the output's
        one consumer masks it: _ForkReLUGrad); the forward is the same."""
        if not self.uses_cudnn(x):
            y, shift = self.conv_nobias(x)
            shift = combine(shift) if combine is not None else shift
            residual = residual.to(y.dtype) if residual is not None else None
            if not mask_grad and torch.is_grad_enabled():
                return _BiasReLUMaskedGrad.apply(y, shift, residual)
            return bias_act(y, shift, residual=residual, relu=True)
        dtype = autocast_dtype(x, self.weight)
        weight, shift = self._folded(x, cast_shift=combine is None)
        if combine is not None:
            shift = combine(shift)
        # each a no-op where the tensor already has the dtype (the cached folded weight and cast shift do); x is cast
        # after _operands, whose space-to-depth copies cast it on the way
        weight, shift = weight.to(dtype), shift.to(dtype)
        x, weight, stride, padding = self._operands(x, weight)
        x = x.to(dtype)
        residual = residual.to(dtype) if residual is not None else None
        conv = (stride, padding, self.dilation, self.groups)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, shift, residual)):
            return _ConvBiasReLU.apply(x, weight, shift, residual, *conv, mask_grad)
        return _cudnn_forward(x, weight, shift, residual, *conv)

    def forward(self, x):
        if self.fused_relu:
            return self.conv_bias_relu(x)
        weight, shift = self._folded(x, cast_shift=True)
        return self._conv(x, weight, shift)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, stride={self.stride}" + (
            ", fused_relu=True" if self.fused_relu else "") + (", cudnn_fusion=True" if self.cudnn_fusion else "") + (
            ", space_to_depth=True" if self.space_to_depth else "")


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """Keeps the frozen statistics as buffers (for checkpoints); the convolution before it applies them."""

    def forward(self, x):
        return x


def _as_folded_bn(bn: FrozenBatchNorm2d) -> FoldedFrozenBatchNorm2d:
    new = FoldedFrozenBatchNorm2d(bn.weight.shape[0], eps=bn.eps).to(device=bn.weight.device, dtype=bn.weight.dtype)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(new, name).copy_(getattr(bn, name))
    return new


# TrunkFold folds the trainable weights with one scale_many launch each way (True) or, as before it, one product per
# weight each way (False: kept for benchmarks/bench_step.py's comparison; the values are the same bit for bit)
TRAINABLE_SCALE_MANY = True


class TrunkFold:
    """The folding of every FoldedConv2d of a trunk at once, for a forward that cannot use the per-convolution
    caches: while a CUDA graph is captured (model.flat_cast with fold_bn).

    There each convolution would compute its scale and shift from the BatchNorm buffers inline (about five kernels)
    and fold and cast a frozen weight (two more), some 300 kernels per replay for ResNet-50. TrunkFold concatenates
    the buffers and computes every scale and shift in one pass, folds and casts the frozen weights in one more, and
    lends each convolution its slices for the forward (FoldedConv2d._lent); the trainable weights are multiplied by
    their scales, and written in the operand dtype, by one more launch (detr_fast.ops.scale_many, whose backward
    brings all their gradients back in one), where each weight once took a product of its own each way (84 launches
    for ResNet-50's layers 2-4). About fifteen kernels in all, every one reading the buffers themselves, as the
    captured graph must. The values are bit-identical to the per-convolution path. Eager forwards keep the caches
    (no kernels at all) and torch.compile traces the per-convolution path; TrunkFold also stands aside when the
    BatchNorms do not share one eps and the weights' dtype and device, or when their buffers require gradients."""

    def __init__(self, module: nn.Module):
        self.convs = [m for m in module.modules() if isinstance(m, FoldedConv2d)]
        self._index: dict = {}

    def _usable(self) -> bool:
        w0, bn0 = self.convs[0].weight, self.convs[0]._bn
        for c in self.convs:
            bn = c._bn
            bufs = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
            if bn.eps != bn0.eps or c.weight.dtype != w0.dtype or c.weight.device != w0.device or any(
                    t.dtype != w0.dtype or t.device != w0.device or t.requires_grad for t in bufs):
                return False
        return True

    def _channel_index(self, convs: list, device) -> torch.Tensor:
        """For each element of the convs' weights in flatten order, its output channel among all of theirs: [n]
        int64 on device. Made on the host on the first call for a set of shapes (an eager warm-up step runs before
        any capture) and kept; the frozen weights it serves are small (ResNet-50: 0.2 M elements)."""
        key = (device, tuple(id(c) for c in convs))  # the convolutions' shapes are fixed; which are frozen is not
        hit = self._index.get(key)
        if hit is None:
            chans = torch.arange(sum(c.weight.shape[0] for c in convs))
            reps = torch.tensor([math.prod(c.weight.shape[1:]) for c in convs for _ in range(c.weight.shape[0])])
            hit = chans.repeat_interleave(reps).to(device)
            self._index[key] = hit
        return hit

    def prepare(self) -> None:
        """Makes what a later capture needs from the host (the channel index); called on eager forwards (a dict
        lookup once made: no device work, little host time)."""
        frozen = [c for c in self.convs if not c.weight.requires_grad]
        if frozen:
            self._channel_index(frozen, frozen[0].weight.device)

    @contextmanager
    def applied(self, x: torch.Tensor):
        if not self.convs or torch.compiler.is_compiling():
            yield
            return
        if not _capturing(x):
            self.prepare()
            yield
            return
        if not self._usable():
            yield
            return
        w0 = self.convs[0].weight
        wdt = autocast_dtype(x, w0)
        frozen = [c for c in self.convs if not c.weight.requires_grad]
        order = frozen + [c for c in self.convs if c.weight.requires_grad]
        bns = [c._bn for c in order]
        chans = [c.weight.shape[0] for c in order]
        with torch.no_grad():
            var = torch.cat([bn.running_var for bn in bns])
            scale = torch.cat([bn.weight for bn in bns]) * (var + bns[0].eps).rsqrt()
            shift = torch.cat([bn.bias for bn in bns]) - torch.cat([bn.running_mean for bn in bns]) * scale
            shifts = shift.split(chans)
            lows = shift.to(wdt).split(chans) if wdt != shift.dtype else [None] * len(order)
            weights = [None] * len(order)
            if frozen:
                ws = [c.weight for c in frozen]
                flat = torch.cat([flatten(w) for w in ws])
                flat.mul_(scale.index_select(0, self._channel_index(frozen, w0.device)))  # frozen channels come first
                weights[:len(frozen)] = unflatten(flat.to(wdt), [w.numel() for w in ws], [w.shape for w in ws],
                                                  [channels_last(w) for w in ws])
        # the trainable weights, each times its channels' scale in the operand dtype, by one launch (ScaleMany; its
        # backward brings the gradients back in one more): outside no_grad, the gradient reaches W through it
        trainable = [c.weight for c in order[len(frozen):]]
        if trainable and TRAINABLE_SCALE_MANY:
            weights[len(frozen):] = ScaleMany.apply(scale[sum(chans[:len(frozen)]):], wdt, *trainable)
        scales = [s.view(-1, 1, 1, 1) for s in scale.split(chans)]
        try:
            for c, w, sc, t, t_low in zip(order, weights, scales, shifts, lows):
                c._lent = (w, sc, t, t_low)
            yield
        finally:
            for c in order:
                c._lent = None


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


class BiasActBlock(nn.Module):
    """A folded torchvision Bottleneck or BasicBlock whose biases, residual add and ReLUs run as bias_act calls.

    Keeps the block's children under their names (conv1, bn1, ..., relu, downsample), so state-dict keys are those
    of the block. Per conv but the last: conv without bias -> bias_act(relu). The last: conv without bias ->
    bias_act(bias + downsample bias, residual = x or the downsample conv's raw output, relu): the downsample's
    bias is folded into the combined bias, so its output is never touched on its own."""

    def __init__(self, block: Bottleneck | BasicBlock):
        super().__init__()
        for name, child in block.named_children():
            setattr(self, name, child)
        self.downsample = getattr(block, "downsample", None)
        self.stride = block.stride
        self.n_convs = 3 if isinstance(block, Bottleneck) else 2
        self._bias_sum: tuple = ()  # (last conv's shift, downsample's shift, their sum) while both are cached

    def _combined_bias(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """s + t, reused while both operands are the same cached tensors (identity is safe: they are held here)."""
        if not _may_cache(s) or s.requires_grad or t.requires_grad:
            return s + t
        c = self._bias_sum
        if c and c[0] is s and c[1] is t:
            return c[2]
        with torch.inference_mode(False), torch.no_grad():
            out = s + t
        self._bias_sum = (s, t, out)
        return out

    def _apply(self, *args, **kwargs):
        self._bias_sum = ()
        return super()._apply(*args, **kwargs)

    def forward(self, x, raw_in: bool = False, raw_out: bool = False):
        """raw_in: x is the previous block's output left unmasked for its gradient (raw_out there): its two uses go
        through _ForkReLUGrad, which masks their summed gradient. raw_out: the same for this block's output, whose
        one consumer must then be the next block with raw_in (ResidualGradChain)."""
        convs = [getattr(self, f"conv{i}") for i in range(1, self.n_convs + 1)]
        x_main = x_side = x
        if raw_in and torch.is_grad_enabled() and x.requires_grad:
            x_main, x_side = _ForkReLUGrad.apply(x)
        y = x_main
        for conv in convs[:-1]:
            y = conv.conv_bias_relu(y)
        if self.downsample is None:
            return convs[-1].conv_bias_relu(y, residual=x_side, mask_grad=not raw_out)
        identity, t = self.downsample[0].conv_nobias(x_side)  # its bias joins the last convolution's
        return convs[-1].conv_bias_relu(y, residual=identity, combine=lambda s: self._combined_bias(s, t),
                                        mask_grad=not raw_out)


def _is_folded_block(block: nn.Module) -> bool:
    if not isinstance(block, (Bottleneck, BasicBlock)):
        return False
    n = 3 if isinstance(block, Bottleneck) else 2
    folded = all(isinstance(getattr(block, f"conv{i}"), FoldedConv2d) for i in range(1, n + 1))
    ds = block.downsample
    return folded and (ds is None or isinstance(ds, nn.Sequential) and len(ds) == 2
                       and isinstance(ds[0], FoldedConv2d) and isinstance(ds[1], FoldedFrozenBatchNorm2d))


def fuse_bias_act(module: nn.Module) -> int:
    """Replace every folded Bottleneck / BasicBlock in module by a BiasActBlock, and run a folded stem (conv1, bn1,
    relu as siblings) as conv + bias_act(relu); in place, after fold_frozen_bn. Returns the stems and blocks fused.
    State-dict keys and values are unchanged."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if _is_folded_block(child):
                setattr(parent, name, BiasActBlock(child))
                count += 1
        if not isinstance(parent, (ResNet, IntermediateLayerGetter)):  # where conv1, bn1, relu run in sequence
            continue
        conv, bn, relu = getattr(parent, "conv1", None), getattr(parent, "bn1", None), getattr(parent, "relu", None)
        if isinstance(conv, FoldedConv2d) and isinstance(bn, FoldedFrozenBatchNorm2d) and isinstance(relu, nn.ReLU):
            conv.fused_relu = True
            parent.relu = nn.Identity()
            count += 1
    return count


def pad_stem_channels(module: nn.Module, channels: int) -> int:
    """Let the folded stem convolution of module (ResNet's conv1: 3 input channels) run on its input and weight
    zero-padded to `channels` input channels where no gradient flows (model.stem_pad_channels): with 3 channels a
    channels_last convolution's pixels are 6 bytes in bf16, off the 16-byte alignment tensor-core kernels load; at 8
    they are 16. Exact up to the convolution's summation order. Returns the convolutions marked (0 or 1)."""
    count = 0
    for parent in module.modules():
        conv = getattr(parent, "conv1", None) if isinstance(parent, (ResNet, IntermediateLayerGetter)) else None
        if isinstance(conv, FoldedConv2d) and conv.weight.shape[1] < channels:
            conv.pad_in = channels
            count += 1
    return count


def stem_space_to_depth(module: nn.Module) -> int:
    """Let the folded stem convolution of module (ResNet's conv1: 3 input channels, 7x7, stride 2, padding 3) run
    where no gradient flows as a stride-1, unpadded 4x4 convolution over the space-to-depth of its input (16 channels:
    12 from the 2x2 pixel blocks, 4 zero) with the weight rearranged to match (model.stem_space_to_depth): the same
    products, exact up to the summation order, while with 3 input channels cuDNN has no efficient kernel for it.
    Takes precedence over pad_stem_channels where both are set (the space-to-depth input is already padded to a
    multiple of 8 channels). Returns the convolutions marked (0 or 1)."""
    count = 0
    for parent in module.modules():
        conv = getattr(parent, "conv1", None) if isinstance(parent, (ResNet, IntermediateLayerGetter)) else None
        if isinstance(conv, FoldedConv2d) and s2d_fits(conv.weight, conv.stride, conv.padding, conv.dilation,
                                                       conv.groups):
            conv.space_to_depth = True
            count += 1
    return count


def fuse_conv_relu(module: nn.Module) -> int:
    """Let the fused stem and every BiasActBlock of module run, on a GPU, as cuDNN calls of convolution + bias
    (+ residual) + ReLU (see the module's docstring). In place, after fuse_bias_act; returns the convolutions
    marked. State-dict keys and values are unchanged."""
    convs = []
    for m in module.modules():
        if isinstance(m, FoldedConv2d) and m.fused_relu:
            convs.append(m)
        elif isinstance(m, BiasActBlock):
            convs += [getattr(m, f"conv{i}") for i in range(1, m.n_convs + 1)]
    for c in convs:
        c.cudnn_fusion = True
    return len(convs)


class ResidualGradChain(nn.Sequential):
    """A ResNet stage (its BiasActBlocks, under their names: the state dict is unchanged) whose inner joints sum and
    mask their two gradients in one pass (fuse_residual_grad): each block but the last leaves its output's ReLU mask
    to the next block. raw_in / raw_out extend that to the stage's own input and output (ChainedLayerGetter, between
    stages). Runs the plain path, every block masking its own output, where it is not usable()."""

    def usable(self) -> bool:
        """False under torch.compile's tracing, with gradients off (the forward is the same either way) and when the
        stage or one of its blocks carries a forward hook, which would see unmasked outputs."""
        glob = torch.nn.modules.module
        return not torch.compiler.is_compiling() and torch.is_grad_enabled() and not (
            glob._global_forward_hooks or glob._global_forward_pre_hooks or self._forward_hooks
            or self._forward_pre_hooks or any(b._forward_hooks or b._forward_pre_hooks for b in self))

    def forward(self, x, raw_in: bool = False, raw_out: bool = False):
        if not self.usable():
            return super().forward(x)
        last = len(self) - 1
        for i, block in enumerate(self):
            x = block(x, raw_in=raw_in if i == 0 else True, raw_out=raw_out if i == last else True)
        return x


class ChainedLayerGetter(IntermediateLayerGetter):
    """A trunk's IntermediateLayerGetter whose consecutive ResidualGradChain stages are joined as well: a stage whose
    output is not returned as a feature leaves its last ReLU's mask to the next stage's first block (both usable()),
    so the joints between stages (ResNet-50: the inputs of layer3 and layer4 that gradients reach) take the one-pass
    sum too. Set by fuse_residual_grad on the getter itself; same children, same state dict."""

    def forward(self, x):
        out = OrderedDict()
        items = list(self.items())
        raw = False
        for i, (name, module) in enumerate(items):
            if isinstance(module, ResidualGradChain):
                nxt = items[i + 1][1] if i + 1 < len(items) else None
                raw_out = (name not in self.return_layers and isinstance(nxt, ResidualGradChain) and module.usable()
                           and nxt.usable())
                x = module(x, raw_in=raw, raw_out=raw_out)
                raw = raw_out
            else:
                x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


def fuse_residual_grad(module: nn.Module) -> int:
    """Turn every stage of module (an nn.Sequential of two or more BiasActBlocks) into a ResidualGradChain, and a
    trunk's IntermediateLayerGetter into a ChainedLayerGetter, in place, after fuse_bias_act (and fuse_conv_relu, with
    which it composes). Returns the joints fused: blocks - 1 per stage, and one between consecutive stages whose first
    is not returned. State-dict keys and values are unchanged."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Sequential and len(child) > 1 and all(isinstance(b, BiasActBlock) for b in child):
                chain = ResidualGradChain()
                for bname, block in child.named_children():
                    chain.add_module(bname, block)
                setattr(parent, name, chain)
                count += len(chain) - 1
    for getter in [m for m in module.modules() if type(m) is IntermediateLayerGetter]:
        getter.__class__ = ChainedLayerGetter  # a subclass with no state of its own: only forward differs
        items = list(getter.items())
        count += sum(isinstance(a, ResidualGradChain) and isinstance(b, ResidualGradChain)
                     and name not in getter.return_layers for (name, a), (_, b) in zip(items, items[1:]))
    return count


class _ForkReLUGrad(torch.autograd.Function):
    """x (a ReLU's output whose producer leaves the mask to this node) -> two aliases of x, one per consumer; backward:
    their two gradients summed and masked by x > 0 in one pass (relu_backward_sum), bit for bit what autograd's sum
    and the ReLU's threshold_backward give. x is saved by the first convolution anyway: no memory is added."""

    @staticmethod
    def forward(ctx, x):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x)
        return x.view_as(x), x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_a, grad_b):
        (x,) = ctx.saved_tensors
        if grad_a is None or grad_b is None:
            g = grad_a if grad_b is None else grad_b
            return None if g is None else torch.ops.aten.threshold_backward(g, x, 0)
        return relu_backward_sum(grad_a, grad_b, x)


class _BiasReLUMaskedGrad(torch.autograd.Function):
    """relu(y + bias + residual) by bias_act, for an output whose consumer masks its gradient (_ForkReLUGrad): the
    backward passes the incoming gradient on to y and residual as it is, and its channel sums to the bias; bias_act's
    own backward would mask it a second time (the same values, one more pass)."""

    @staticmethod
    def forward(ctx, y, bias, residual):
        ctx.has_residual = residual is not None
        ctx.bias_dtype = bias.dtype
        return bias_act(y, bias, residual=residual, relu=True)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grad_bias = bias_grad(grad, ctx.bias_dtype) if ctx.needs_input_grad[1] else None
        return grad, grad_bias, grad if ctx.has_residual and ctx.needs_input_grad[2] else None


def _cudnn_forward(x, weight, bias, residual, stride, padding, dilation, groups):
    """relu(conv2d(x, weight, bias) + residual) by cuDNN's fused operators (no backward of their own)."""
    if residual is None:
        return torch.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
    return torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, stride, padding, dilation, groups)


class _ConvBiasReLU(torch.autograd.Function):
    """out = relu(conv2d(x, weight, bias) + residual) forward by _cudnn_forward; backward: g * (out > 0), then the
    convolution's backward for x and weight, the channel sums for the bias, g * (out > 0) itself for the residual.
    mask_grad=False: g is the incoming gradient itself (already masked by the output's consumer)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, stride, padding, dilation, groups, mask_grad=True):
        out = _cudnn_forward(x, weight, bias, residual, stride, padding, dilation, groups)
        ctx.save_for_backward(x, weight, out if mask_grad else None)
        ctx.conv = (list(stride), list(padding), list(dilation), groups)
        ctx.mask_grad = mask_grad
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, out = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        g = torch.ops.aten.threshold_backward(grad, out, 0) if ctx.mask_grad else grad
        gx = gw = None
        if need_x or need_w:
            gx, gw, _ = torch.ops.aten.convolution_backward(g, x, weight, None, stride, padding, dilation, False,
                                                            [0] * len(stride), groups, [need_x, need_w, False])
        gb = g.sum((0, 2, 3)) if need_b else None
        return gx, gw, gb, g if need_r else None, None, None, None, None, None
