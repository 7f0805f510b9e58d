"""model.stem_space_to_depth: the folded stride-2 stem convolution runs as a stride-1 convolution over its input's
space-to-depth with the weight rearranged to match; the model computes the same function up to the convolution's
summation order, and the plain path runs wherever a gradient reaches the input or the weight."""
import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_and_cuda, randomize_frozen_bn, registry_results
from torchvision.models import resnet18
from torchvision.ops.misc import FrozenBatchNorm2d

from detr_fast.config import ConfigError, load_config
from detr_fast.models import fold
from detr_fast.models.backbone import Backbone
from detr_fast.ops import has_kernel, reference, space_to_depth
from detr_fast.models.fold import (FoldedConv2d, fold_frozen_bn, fuse_bias_act, fuse_conv_relu, pad_stem_channels,
                                   stem_space_to_depth)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_step import build, make_batch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:detr_fast.ops.bias_act")

OVER = ["model.num_classes=7", "model.backbone=resnet18", "model.hidden_dim=64", "model.nheads=2",
        "model.enc_layers=2", "model.dec_layers=2", "model.dim_feedforward=128", "model.num_queries=12",
        "model.dropout=0.0"]


def _folded_conv(c_in, c_out, k, padding, seed, dtype=torch.float64):
    """A FoldedConv2d (stride 2) with random weight and frozen statistics, marked for space-to-depth."""
    gen = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(c_in, c_out, k, stride=2, padding=padding, bias=False)
    bn = FrozenBatchNorm2d(c_out)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        bn.weight.copy_(torch.rand(c_out, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(c_out, generator=gen))
        bn.running_mean.copy_(torch.randn(c_out, generator=gen) * 0.2)
        bn.running_var.copy_(torch.rand(c_out, generator=gen) + 0.5)
    folded = FoldedConv2d(conv.to(dtype), bn.to(dtype))
    folded.space_to_depth = True
    return folded


def _trunks(name, dtype, fused=False):
    """(unmarked, marked) folded ResNet trunks with the same weights and random frozen statistics; fused: after
    fuse_bias_act and fuse_conv_relu."""
    torch.manual_seed(0)
    plain = Backbone(name, train_backbone=True, frozen_bn=True).body
    randomize_frozen_bn(plain, 1)
    fold_frozen_bn(plain)
    if fused:
        fuse_bias_act(plain)
        fuse_conv_relu(plain)
    marked = copy.deepcopy(plain)
    assert stem_space_to_depth(marked) == 1
    return plain.to(dtype), marked.to(dtype)


@pytest.fixture
def s2d_calls(monkeypatch):
    """Records, per call of FoldedConv2d._space_to_depth, the input's channels and whether the rewrite applied."""
    calls = []
    real = FoldedConv2d._space_to_depth

    def spy(self, x, weight):
        out = real(self, x, weight)
        calls.append((x.shape[1], out is not None))
        return out
    monkeypatch.setattr(FoldedConv2d, "_space_to_depth", spy)
    return calls


# (C, k, padding): every kernel with no padding, half its size (the "same" padding) and one between or beyond
CASES = [(c, k, p) for c in (1, 3, 5) for k in (3, 5, 7) for p in sorted({0, k // 2, k // 2 + 1})]
CASES += [(3, 7, (1, 3)), (2, 5, (3, 0)), (3, 1, 0)]
SIZES = [(7, 7), (8, 33), (33, 8), (97, 131), (131, 97)]


@pytest.mark.parametrize("c,k,padding", CASES, ids=str)
def test_transform_equals_the_strided_convolution(c, k, padding):
    """conv2d(S, W', 1, 0) against conv2d(x, W, 2, p) in float64 (the same products in another order), the output's
    shape exactly; S against its definition (x zero-padded, then every other row and column of each parity)."""
    folded = _folded_conv(c, 6, k, padding, seed=10 * c + k)
    ph, pw = folded.padding
    w = folded.weight.detach()
    gen = torch.Generator().manual_seed(k * 100 + c)
    for i, (h, wd) in enumerate(SIZES):
        x = torch.randn(2, c, h, wd, generator=gen, dtype=torch.float64)
        if i % 2:
            x = x.contiguous(memory_format=torch.channels_last)
        s, w2 = folded._space_to_depth(x, w)
        cs = -(-4 * c // 8) * 8
        kh = (k + 1) // 2
        assert s.shape[1] == w2.shape[1] == cs and w2.shape[2:] == (kh, kh) and s.dtype == w2.dtype == x.dtype
        assert s.is_contiguous(memory_format=torch.channels_last if i % 2 and c > 1 else torch.contiguous_format)
        got = F.conv2d(s, w2)
        want = F.conv2d(x, w, None, 2, (ph, pw))
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * want.abs().max())
        xp = F.pad(x, (pw, 2 * s.shape[3], ph, 2 * s.shape[2]))
        for r in (0, 1):
            for q in (0, 1):
                assert torch.equal(s[:, r * 2 + q:4 * c:4], xp[:, :, r::2, q::2][:, :, :s.shape[2], :s.shape[3]])
        assert not s[:, 4 * c:].any() and not w2[:, 4 * c:].any()


def test_transform_refuses_other_convolutions():
    """Stride 1, an even or non-square kernel, dilation, groups, a string padding: the plain path."""
    x = torch.randn(1, 4, 16, 16, dtype=torch.float64)
    for kw in (dict(kernel_size=3, stride=1, padding=1), dict(kernel_size=4, stride=2, padding=1),
               dict(kernel_size=(3, 5), stride=2, padding=1), dict(kernel_size=3, stride=2, padding=2, dilation=2),
               dict(kernel_size=3, stride=2, padding=1, groups=2), dict(kernel_size=3, stride=(2, 1), padding=1),
               dict(kernel_size=3, stride=2, padding="valid")):
        conv = torch.nn.Conv2d(4, 4, bias=False, **kw).double()
        folded = FoldedConv2d(conv, FrozenBatchNorm2d(4).double())
        folded.space_to_depth = True
        assert not fold.s2d_fits(conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups)
        assert folded._space_to_depth(x, conv.weight.detach()) is None
        xs, ws, stride, padding = folded._operands(x, conv.weight.detach())
        assert xs is x and stride == conv.stride and padding == conv.padding
    folded = _folded_conv(3, 4, 7, 0, seed=0)
    assert folded._space_to_depth(torch.randn(1, 3, 5, 9, dtype=torch.float64), folded.weight.detach()) is None


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_marked_trunk_equals_the_unmarked_one(name, s2d_calls):
    """The folded trunk with its stem marked: the stem's output and the trunk's in float64 to summation order, in
    float32 close; the stem ran in the space-to-depth form (16 channels), no other convolution did."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 67, 95, generator=gen, dtype=torch.float64)
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        plain, marked = _trunks(name, dtype)
        xd = x.to(dtype)
        with torch.no_grad():
            stem0 = plain.conv1(xd)
            s2d_calls.clear()
            stem1 = marked.conv1(xd)
        assert s2d_calls == [(3, True)]
        torch.testing.assert_close(stem1, stem0, rtol=rtol, atol=rtol * stem0.abs().max())
        for _ in range(2):  # the second pass reads the cached folded and rearranged weights
            out0 = plain(xd)["0"].detach()
            s2d_calls.clear()
            out1 = marked(xd)["0"].detach()
            assert s2d_calls[0] == (3, True) and not any(applied for _, applied in s2d_calls[1:])
            torch.testing.assert_close(out1, out0, rtol=rtol, atol=rtol * out0.abs().max())


def test_marked_stem_under_cpu_autocast_by_the_low_precision_rule():
    """bf16 autocast on the CPU: the marked stem's (and trunk's) error against float64 is at most twice the unmarked
    one's."""
    plain, marked = _trunks("resnet18", torch.float32)
    exact_net = copy.deepcopy(plain).double()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 97, 131, generator=gen)
    with torch.no_grad():
        exact_stem, exact_out = exact_net.conv1(x.double()), exact_net(x.double())["0"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            stems = [net.conv1(x) for net in (plain, marked)]
            outs = [net(x)["0"] for net in (plain, marked)]
    assert all(s.dtype == torch.bfloat16 for s in stems)
    for (a, b), exact in ((stems, exact_stem), (outs, exact_out)):
        err0, err1 = ((o.double() - exact).abs().max() for o in (a, b))
        assert err1 <= 2 * err0 + 1e-6, (err0, err1)


def _stand_in(calls):
    """A stand-in for cuDNN's fused operators (the CPU has none), their plain math, recording each call's input
    channels, stride and padding."""
    def forward(x, weight, bias, residual, stride, padding, dilation, groups):
        calls.append((x.shape[1], tuple(stride), tuple(padding)))
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return torch.relu(y + residual if residual is not None else y)
    return forward


@pytest.mark.parametrize("cudnn", [False, True], ids=["bias_act", "cudnn_stand_in"])
def test_fused_stem_equals_the_unmarked_one(monkeypatch, s2d_calls, cudnn):
    """The fused stem (fuse_bias_act + fuse_conv_relu): on the CPU through conv_nobias and bias_act; with cuDNN's
    operators stood in for by their math, through conv_bias_relu's cuDNN branch, which then receives the 16-channel
    input with stride 1 and no padding. Trunk output and gradients in float64 against the unmarked fused trunk."""
    calls = []
    if cudnn:
        monkeypatch.setattr(fold, "_cudnn_forward", _stand_in(calls))
        monkeypatch.setattr(FoldedConv2d, "uses_cudnn", lambda self, x: self.cudnn_fusion)
    plain, marked = _trunks("resnet18", torch.float64, fused=True)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 67, 95, generator=gen, dtype=torch.float64)
    res = []
    for net in (plain, marked):
        calls.clear()
        s2d_calls.clear()
        out = net(x)["0"]
        out.square().sum().backward()
        res.append((out.detach(), {n: p.grad for n, p in net.named_parameters() if p.grad is not None}))
    assert s2d_calls[0] == (3, True)  # the marked trunk's stem
    if cudnn:  # the marked trunk's calls: its stem first, then every block convolution as it was
        assert calls[0] == (16, (1, 1), (0, 0)) and len(calls) == 1 + 8 * 2
        assert all(stride in ((1, 1), (2, 2)) and padding != (0, 0) for _, stride, padding in calls[1:])
    (out0, g0), (out1, g1) = res
    torch.testing.assert_close(out1, out0, rtol=1e-10, atol=1e-10 * out0.abs().max())
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-9, atol=1e-9 * g0[n].abs().max(), msg=n)


def test_plain_path_where_gradients_flow(s2d_calls):
    """An input or a stem weight that needs a gradient: the plain convolution runs, and the gradients are the
    unmarked module's bit for bit."""
    plain, marked = _trunks("resnet18", torch.float64)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 33, 47, generator=gen, dtype=torch.float64)
    for trainable_stem in (False, True):
        grads = []
        for net in (plain, marked):
            net.conv1.weight.requires_grad_(trainable_stem)
            net.zero_grad(set_to_none=True)
            xx = x.clone().requires_grad_(not trainable_stem)
            s2d_calls.clear()
            net(xx)["0"].square().sum().backward()
            grads.append([xx.grad] + [net.conv1.weight.grad])
        assert s2d_calls and not any(applied for _, applied in s2d_calls)
        (dx0, dw0), (dx1, dw1) = grads
        if trainable_stem:
            assert dx0 is dx1 is None and torch.equal(dw1, dw0)
        else:
            assert dw0 is dw1 is None and torch.equal(dx1, dx0)


def test_cached_weight_follows_the_statistics():
    """The rearranged weight of a frozen stem is made once and reused; an in-place load of new statistics reaches it
    (the folded weight it is keyed on changes)."""
    folded = _folded_conv(3, 8, 7, 3, seed=8)
    folded.weight.requires_grad_(False)
    ref = copy.deepcopy(folded)
    ref.space_to_depth = False
    x = torch.randn(2, 3, 29, 31, dtype=torch.float64)
    folded(x)
    first = folded._cache["s2d_weight"][1]
    folded(x)
    assert folded._cache["s2d_weight"][1] is first
    with torch.no_grad():
        folded._bn.weight.mul_(2.0)
        ref._bn.weight.mul_(2.0)
    out = folded(x)
    assert folded._cache["s2d_weight"][1] is not first
    torch.testing.assert_close(out, ref(x), rtol=1e-12, atol=1e-12)


def test_space_to_depth_wins_over_pad_in():
    """With both set, the space-to-depth operands (16 channels, stride 1, no padding); where a gradient flows,
    neither."""
    folded = _folded_conv(3, 8, 7, 3, seed=9)
    folded.pad_in = 8
    x = torch.randn(1, 3, 20, 24, dtype=torch.float64)
    with torch.no_grad():
        xs, ws, stride, padding = folded._operands(x, folded.weight)
    assert xs.shape[1] == ws.shape[1] == 16 and stride == (1, 1) and padding == (0, 0)
    xg = x.clone().requires_grad_(True)
    xs, ws, stride, padding = folded._operands(xg, folded.weight.detach())
    assert xs is xg and stride == (2, 2) and padding == (3, 3)


def test_lent_weights_in_a_simulated_capture(monkeypatch, s2d_calls):
    """Under a capture TrunkFold lends the stem its folded weight (flat_cast) and the rearranged weight is made
    inline, never cached: the same loss."""
    batch = make_batch(2, 64, 96, 7, "cpu", seed=7, max_targets=4)
    extra = ["model.fused_bias_act=true", "model.flat_cast=true"]
    l0, _ = _loss(extra, batch)
    monkeypatch.setattr(fold, "_capturing", lambda x: True)
    s2d_calls.clear()
    l1, model = _loss(extra + ["model.stem_space_to_depth=true"], batch)
    assert (3, True) in s2d_calls
    assert "s2d_weight" not in model.backbone[0].body.conv1._cache
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=0)


def test_state_dict_marking_and_config():
    torch.manual_seed(0)
    plain = Backbone("resnet18", train_backbone=True, frozen_bn=True).body
    assert stem_space_to_depth(plain) == 0  # not folded
    fold_frozen_bn(plain)
    marked = copy.deepcopy(plain)
    assert stem_space_to_depth(marked) == 1
    assert marked.conv1.space_to_depth and "space_to_depth=True" in repr(marked.conv1)
    assert "space_to_depth" not in repr(plain.conv1)
    assert sum(getattr(m, "space_to_depth", False) for m in marked.modules()) == 1
    s0, s1 = plain.state_dict(), marked.state_dict()
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    net = resnet18(norm_layer=FrozenBatchNorm2d)
    fold_frozen_bn(net)
    assert stem_space_to_depth(net) == 1  # a torchvision ResNet itself
    assert stem_space_to_depth(Backbone("light", frozen_bn=False).body) == 0
    assert stem_space_to_depth(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 7, 2, 3))) == 0
    assert pad_stem_channels(marked, 8) == 1  # both may be set; space-to-depth wins at run time

    assert load_config(None, ["model.stem_space_to_depth=true"]).model.stem_space_to_depth
    for bad in (["model.backbone=light"], ["model.fold_bn=false"], ["model.frozen_bn=false"]):
        with pytest.raises(ConfigError, match="stem_space_to_depth"):
            load_config(None, ["model.stem_space_to_depth=true"] + bad)


def _loss(extra, batch, dtype=torch.float64):
    """(the weighted loss, the model) of one float64 forward of a small DETR built by the benchmark's builder."""
    torch.manual_seed(0)
    cfg, model, criterion = build(OVER + list(extra), "fast_fp32", "cpu")
    model.to(dtype)
    out = model(batch[0].to(dtype), batch[1])
    losses = criterion(out, batch[2])
    return sum(losses[k] * criterion.weight_dict[k] for k in losses), model


@pytest.mark.parametrize("extra", [(), ("model.fused_bias_act=true", "model.conv_fusion=true")],
                         ids=["plain", "fused"])
def test_detr_with_the_rewritten_stem_equals_the_plain_one(extra, s2d_calls):
    """A DETR built from a config with model.stem_space_to_depth=true: loss and trainable gradients in float64 equal
    those without it (to summation order)."""
    batch = make_batch(2, 64, 96, 7, "cpu", seed=6, max_targets=4)
    res = []
    for flag in ([], ["model.stem_space_to_depth=true"]):
        s2d_calls.clear()
        loss, model = _loss(list(extra) + flag, batch)
        loss.backward()
        res.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        assert model.backbone[0].body.conv1.space_to_depth == bool(flag)
    assert (3, True) in s2d_calls
    (l0, g0), (l1, g1) = res
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=0)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.needs_cuda
def test_marked_stem_on_gpu_by_the_low_precision_rule():
    """The stem convolution in bf16 channels_last on a GPU, through cuDNN's fused conv + bias + ReLU and through the
    plain convolution: the marked run's error against float64 is at most twice the unmarked run's."""
    folded = _folded_conv(3, 64, 7, 3, seed=3, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 97, 131, generator=gen)
    with torch.no_grad():  # the exact reference, on the CPU in float64, before anything moves
        scale, shift = folded._scale_shift_now()
        exact = F.conv2d(x.double(), (folded.weight * scale).double(), None, 2, 3)
        exact_relu = torch.relu(exact + shift.double().view(1, -1, 1, 1))
    folded.cuda()
    folded._bn.cuda()  # not a submodule (its buffers keep their own names): moved on its own
    x = x.cuda().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for fused in (False, True):
            folded.fused_relu = folded.cudnn_fusion = fused
            outs = []
            for s2d in (False, True):
                folded.space_to_depth = s2d
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    outs.append(folded.conv_bias_relu(x) if fused else folded.conv_nobias(x)[0])
            assert folded.uses_cudnn(x) == fused
            ref = exact_relu if fused else exact
            assert outs[1].shape == ref.shape and outs[1].dtype == torch.bfloat16
            err0, err1 = ((o.double().cpu() - ref).abs().max() for o in outs)
            assert err1 <= 2 * err0 + 1e-6, (fused, err0, err1)


# ---- the space_to_depth op (csrc/pool/s2d_*): the input of the rewritten stem in one pass -------------------------

_S2D_CASES = [((2, 3, 37, 53), 7, (3, 3), 16), ((1, 3, 20, 17), 7, (3, 3), 12), ((2, 5, 9, 8), 3, (1, 0), 24),
              ((1, 2, 7, 5), 5, (0, 2), 9), ((0, 3, 9, 9), 7, (3, 3), 16), ((1, 1, 1, 1), 1, (0, 0), 8)]


@pytest.mark.skipif(not has_kernel("space_to_depth", "cpu"), reason="detr_fast._C is not built")
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.float32, torch.bfloat16), (torch.float16, torch.float64)])
@pytest.mark.parametrize("case", _S2D_CASES)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "strided"])
def test_space_to_depth_op_equals_reference(device, in_dtype, out_dtype, case, layout):
    """The op equals reference.space_to_depth (zero fill + strided copies) bit for bit: a copy and a cast, for
    channels_last, contiguous and strided inputs, odd sizes, an empty batch and a 1x1 input, 16-byte vector channel
    counts (16, 24) and others (12, 9, 8 in float64); the output is channels_last in the asked dtype."""
    shape, kernel, padding, channels = case
    gen = torch.Generator().manual_seed(sum(shape) + kernel)
    x = torch.randn(*shape, generator=gen).to(in_dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        big = torch.randn(shape[0], shape[1], shape[2] + 3, 2 * shape[3], generator=gen).to(in_dtype)
        x = big[:, :, 2:2 + shape[2], ::2]
    want = reference.space_to_depth(x, kernel, padding, channels, out_dtype)
    out = space_to_depth(x.to(device), kernel, padding, channels, out_dtype)
    assert out.dtype == out_dtype and out.device.type == device
    assert out.is_contiguous(memory_format=torch.channels_last) and out.shape == want.shape
    assert torch.equal(out.cpu(), want)


@pytest.mark.skipif(not has_kernel("space_to_depth", "cpu"), reason="detr_fast._C is not built")
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_space_to_depth_op_refuses_bad_arguments(device):
    op = torch.ops.detr_fast.space_to_depth
    x = torch.randn(1, 3, 5, 5, device=device)
    for args, match in [((x, 4, [1, 1], 16, torch.float32), "odd"),
                        ((x, 7, [-1, 0], 16, torch.float32), "non-negative"),
                        ((x, 7, [0, 0], 16, torch.float32), "smaller than the kernel"),
                        ((x, 7, [3, 3], 11, torch.float32), "at least"),
                        ((x[0], 7, [3, 3], 16, torch.float32), r"\[B, C, H, W\]"),
                        ((x.to(torch.int32), 7, [3, 3], 16, torch.float32), "float32"),
                        ((x, 7, [3, 3], 16, torch.int64), "dtype")]:
        with pytest.raises(ValueError, match=match):
            op(*args)


@pytest.mark.skipif(not has_kernel("space_to_depth", "cpu"), reason="detr_fast._C is not built")
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_space_to_depth_registry_cases(device):
    results = registry_results("space_to_depth", device, seed=710)
    assert len({r.case for r in results}) == 4
    assert all(r.passed for r in results), [r for r in results if not r.passed]


@pytest.mark.skipif(not has_kernel("space_to_depth", "cpu"), reason="detr_fast._C is not built")
def test_space_to_depth_fake_and_opcheck():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 3, 13, 10))
        out = torch.ops.detr_fast.space_to_depth(x, 7, [3, 3], 16, torch.bfloat16)
    assert out.shape == (2, 16, 10, 8) and out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 13, 10).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.detr_fast.space_to_depth, (x, 7, [3, 3], 16, torch.bfloat16))


@pytest.mark.skipif(not has_kernel("space_to_depth", "cpu"), reason="detr_fast._C is not built")
def test_stem_takes_the_op_for_a_channels_last_input(monkeypatch):
    """A channels_last input (the fast path's) builds S with the op, a contiguous one with the torch path; both give
    the same convolution."""
    calls = []
    real = torch.ops.detr_fast.space_to_depth

    def spy(*args):
        calls.append(args[0].is_contiguous(memory_format=torch.channels_last))
        return real(*args)

    monkeypatch.setattr(fold, "space_to_depth", lambda *a: spy(a[0], a[1], list(a[2]), a[3], a[4]))
    folded = _folded_conv(3, 8, 7, 3, seed=5, dtype=torch.float32)
    x = torch.randn(2, 3, 21, 18)
    with torch.no_grad():
        plain = folded(x)
        cl = folded(x.contiguous(memory_format=torch.channels_last))
    assert calls == [True]
    torch.testing.assert_close(cl, plain, rtol=1e-5, atol=1e-5)
