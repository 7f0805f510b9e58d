"""model.residual_grad_fusion and its op, detr_fast.ops.relu_backward_sum.

The op sums the two gradients that reach a ReLU's output and masks the sum by that output in one pass; it must equal
autograd's sum followed by threshold_backward (reference.relu_backward_sum) bit for bit, in every dtype and layout.
The model option chains the blocks of each ResNet stage so that the joints between them use it; the model must
compute the same output and the same gradients, bit for bit, as without it. The CUDA kernel runs here through the
host emulator (test_cuda_emulated.py) and on a GPU in the needs_cuda cases below.
"""
import copy
import sys
from pathlib import Path

import pytest
import torch
from helpers import cpu_and_cuda, registry_results

from detr_fast.config import ConfigError, load_config
from detr_fast.models import fold
from detr_fast.ops import has_kernel, reference, relu_backward_sum
from detr_fast.ops.cases_bias_act import make_sum_inputs, same_layout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_step import build, make_batch  # noqa: E402

pytestmark = pytest.mark.skipif(not has_kernel("relu_backward_sum", "cpu"), reason="detr_fast._C is not built")

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _same(got, want) -> bool:
    """Bit-equal, NaN where NaN, in the same dtype and shape; -0.0 and 0.0 compare equal, so the sign bits of the
    zeros must agree too."""
    return (got.dtype == want.dtype and got.shape == want.shape and torch.equal(got.isnan(), want.isnan())
            and torch.equal(torch.nan_to_num(got, nan=0.0), torch.nan_to_num(want, nan=0.0))
            and torch.equal(torch.signbit(got) & (got == 0), torch.signbit(want) & (want == 0)))


# ---- the op ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,out_cl,grads_cl", [
    ((2, 3, 5, 7), False, None), ((2, 3, 5, 7), True, None), ((3, 16, 9, 11), True, None),
    ((3, 16, 9, 11), True, False), ((2, 8, 5, 5), False, True), ((1, 64, 13, 6), True, None), ((4, 37), False, None),
    ((1003,), False, None), ((2, 8, 33), False, None), ((0, 16, 4, 4), True, None), ((2, 16, 0, 5), False, None)])
def test_matches_reference(device, dtype, shape, out_cl, grads_cl):
    gen = torch.Generator().manual_seed(hash((shape, out_cl, grads_cl, str(dtype))) % 2**31)
    a, b, out = make_sum_inputs(shape, device, dtype, gen, out_cl, grads_cl)
    got = relu_backward_sum(a, b, out)
    assert _same(got, reference.relu_backward_sum(a, b, out))
    assert same_layout(got, out)
    if out.numel():
        assert (got == 0).any() and (got != 0).any()  # the mask took some values and let others through


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values(device, dtype):
    """NaN and infinities in the gradients and in out, signed zeros, an out at 0 (masked, as threshold_backward's
    `out <= 0` masks it), sums that overflow the dtype, and sums that must be rounded once from the float32 sum."""
    big = torch.finfo(dtype).max
    inf, nan = float("inf"), float("nan")
    a = torch.tensor([1.0, nan, inf, -inf, inf, big, -0.0, -0.0, 1.0, 3.0, 1.0, 2.0 ** -8, nan], dtype=dtype)
    b = torch.tensor([2.0, 1.0, 1.0, inf, -inf, big, -0.0, 0.0, 1.0, -3.0, 2.0 ** -9, 2.0 ** -9, 1.0], dtype=dtype)
    o = torch.tensor([1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, nan], dtype=dtype)
    a, b, o = a.to(device), b.to(device), o.to(device)
    assert _same(relu_backward_sum(a, b, o), reference.relu_backward_sum(a, b, o))
    neg = -o.abs()  # every out <= 0 (the NaN aside): all masked
    got = relu_backward_sum(a, b, neg)
    assert _same(got, reference.relu_backward_sum(a, b, neg))
    assert (got[:-1] == 0).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_unaligned_and_strided_inputs(device):
    """Views that start off a 16-byte boundary and gradients with arbitrary strides are brought to out's layout."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(3 * 40 * 6 * 7 + 1, generator=gen).to(device, torch.bfloat16)
    a = base[1:].view(3, 40, 6, 7)  # 2 bytes off alignment
    b = torch.randn(3, 7, 6, 40, generator=gen).to(device, torch.bfloat16).permute(0, 3, 2, 1)
    out = torch.randn(3, 40, 6, 7, generator=gen).relu().to(device, torch.bfloat16)
    assert _same(relu_backward_sum(a, b, out), reference.relu_backward_sum(a, b, out))
    out_cl = out.contiguous(memory_format=torch.channels_last)
    got = relu_backward_sum(a, b, out_cl)
    assert _same(got, reference.relu_backward_sum(a, b, out_cl))
    assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_bad_inputs(device):
    x = torch.rand(2, 3, 4, device=device)
    with pytest.raises(ValueError, match="one shape"):
        relu_backward_sum(x, x[:, :2], x)
    with pytest.raises(ValueError, match="one dtype"):
        relu_backward_sum(x, x.double(), x)
    with pytest.raises(ValueError, match="float32, float64, float16 or bfloat16"):
        relu_backward_sum(x.int(), x.int(), x.int())
    with pytest.raises(ValueError, match="one shape"):
        reference.relu_backward_sum(x, x[:, :2], x)


@pytest.mark.needs_cuda
def test_device_mismatch():
    x = torch.rand(2, 3)
    with pytest.raises(ValueError, match="device"):
        relu_backward_sum(x.cuda(), x, x.cuda())


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_opcheck(device):
    a, b, out = make_sum_inputs((2, 16, 3, 5), device, torch.float32, torch.Generator().manual_seed(2), True)
    torch.library.opcheck(torch.ops.detr_fast.relu_backward_sum, (a, b, out),
                          test_utils=("test_schema", "test_faketensor"))


def test_meta_tensors_give_the_layout():
    out = torch.empty(2, 16, 3, 5, device="meta").contiguous(memory_format=torch.channels_last)
    got = torch.ops.detr_fast.relu_backward_sum(torch.empty(2, 16, 3, 5, device="meta"), out, out)
    assert got.shape == out.shape and got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_registry_cases(device):
    results = registry_results("relu_backward_sum", device, seed=31)
    assert len(results) >= 30
    failed = [(r.case, r.dtype, r.error, r.message) for r in results if not r.passed]
    assert not failed, failed


@pytest.mark.needs_cuda
def test_cpu_and_cuda_agree():
    for dtype in DTYPES:
        a, b, out = make_sum_inputs((3, 24, 7, 9), "cpu", dtype, torch.Generator().manual_seed(4), True)
        assert _same(relu_backward_sum(a.cuda(), b.cuda(), out.cuda()).cpu(), relu_backward_sum(a, b, out))


# ---- the fork and the unmasked backwards ----------------------------------------------------------------------------

def test_fork_sums_and_masks_both_gradients():
    """_ForkReLUGrad's two aliases: their gradients summed and masked, one of them alone masked, in float64 against
    the plain use of x twice."""
    gen = torch.Generator().manual_seed(8)
    pre = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    wa = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
    wb = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
    x = torch.relu(pre)
    want = torch.autograd.grad((x * wa).sum() + (x.sin() * wb).sum(), pre)[0]
    a, b = fold._ForkReLUGrad.apply(pre.detach().relu().requires_grad_(True))
    leaf = a._base
    got = torch.autograd.grad((a * wa).sum() + (b.sin() * wb).sum(), leaf)[0]
    assert torch.equal(got, want)  # x > 0 exactly where pre > 0
    a, b = fold._ForkReLUGrad.apply(leaf)
    got_a = torch.autograd.grad((a * wa).sum(), leaf)[0]
    assert torch.equal(got_a, torch.where(leaf > 0, wa, 0.0))
    assert a.data_ptr() == b.data_ptr() == leaf.data_ptr()  # aliases: no copy


def test_conv_bias_relu_unmasked_backward(monkeypatch):
    """_ConvBiasReLU with mask_grad=False (the cuDNN path of a chained block's output), the forward stood in for by
    the plain math: fed a gradient already masked by its output, it gives what the masking backward gives."""
    def plain(x, weight, bias, residual, stride, padding, dilation, groups):
        y = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return torch.relu(y + residual if residual is not None else y)
    monkeypatch.setattr(fold, "_cudnn_forward", plain)
    gen = torch.Generator().manual_seed(9)
    x, w = (torch.randn(2, 3, 6, 5, generator=gen, dtype=torch.float64), torch.randn(4, 3, 3, 3, generator=gen,
                                                                                       dtype=torch.float64))
    b, r = torch.randn(4, generator=gen, dtype=torch.float64), torch.randn(2, 4, 6, 5, generator=gen,
                                                                          dtype=torch.float64)
    go = torch.randn(2, 4, 6, 5, generator=gen, dtype=torch.float64)
    grads = []
    for mask_grad in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b, r)]
        out = fold._ConvBiasReLU.apply(*leaves, (1, 1), (1, 1), (1, 1), 1, mask_grad)
        g = go if mask_grad else torch.where(out > 0, go, 0.0)
        grads.append(torch.autograd.grad(out, leaves, g))
    for g_masked, g_unmasked in zip(*grads):
        assert torch.equal(g_masked, g_unmasked)


def test_bias_relu_unmasked_backward_gradcheck():
    """_BiasReLUMaskedGrad's backward is bias_act's without the mask: with the mask applied outside it (as the fork
    does) the composition has bias_act's derivatives, checked numerically in float64."""
    gen = torch.Generator().manual_seed(10)
    y = torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(y, bias, r):
        out = fold._BiasReLUMaskedGrad.apply(y, bias, r)
        a, b = fold._ForkReLUGrad.apply(out)
        return a * 0.5 + b.sin()
    assert torch.autograd.gradcheck(f, (y, bias, r))


# ---- the model -----------------------------------------------------------------------------------------------------

OVER = ["model.num_classes=7", "model.hidden_dim=64", "model.nheads=2", "model.enc_layers=1", "model.dec_layers=2",
        "model.dim_feedforward=128", "model.num_queries=12", "model.dropout=0.0", "model.fused_bias_act=true"]


def _run(backbone, extra, batch, dtype=torch.float64, hook=None, calls=None, amp=False, unmasked=None):
    """(model, boxes, loss, gradients) of one forward and backward. calls: gets the shape of each relu_backward_sum
    call; unmasked: gets one entry per block output whose backward leaves the ReLU's mask to its consumer."""
    torch.manual_seed(0)
    cfg, model, criterion = build(OVER + [f"model.backbone={backbone}"] + list(extra), "fast_fp32", "cpu")
    model.to(dtype)
    if hook is not None:
        model.backbone[0].body.layer3[0].register_forward_hook(hook)
    real, real_bias, real_conv = fold.relu_backward_sum, fold._BiasReLUMaskedGrad.apply, fold._ConvBiasReLU.apply
    if calls is not None:
        fold.relu_backward_sum = lambda *a: calls.append(a[2].shape) or real(*a)
    if unmasked is not None:
        fold._BiasReLUMaskedGrad.apply = lambda *a: unmasked.append("bias_act") or real_bias(*a)
        fold._ConvBiasReLU.apply = lambda *a: (unmasked.append("cudnn") if a[-1] is False else None) or real_conv(*a)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(batch[0].to(dtype), batch[1])
            losses = criterion(out, batch[2])
        total = sum(losses[k] * criterion.weight_dict[k] for k in losses)
        total.backward()
    finally:
        fold.relu_backward_sum = real
        fold._BiasReLUMaskedGrad.apply, fold._ConvBiasReLU.apply = real_bias, real_conv
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return model, out["pred_boxes"].detach(), total.detach(), grads


def _assert_same_run(r0, r1):
    (_, b0, l0, g0), (_, b1, l1, g1) = r0, r1
    assert torch.equal(b1, b0) and torch.equal(l1, l0)
    assert g0.keys() == g1.keys() and any("layer2" in n for n in g0)
    for n in g0:
        assert torch.equal(g1[n], g0[n]), n


# joints inside the stages, and between them (the trunk returns only layer4)
@pytest.mark.parametrize("backbone,joints", [("resnet18", 1 + 1 + 1 + 1 + 3), ("resnet50", 2 + 3 + 5 + 2 + 3)])
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_chained_model_equals_the_plain_one(backbone, joints, dtype):
    """Output, loss and every gradient bit for bit, with the joints a gradient reaches taking the one-pass sum: those
    inside layers 2-4 and those between layer2 and layer3 and between layer3 and layer4 (layer1 is frozen: its inner
    joints and the one into layer2 get no gradient)."""
    batch = make_batch(2, 64, 96, 7, "cpu", seed=3, max_targets=4)
    plain = _run(backbone, [], batch, dtype)
    calls, unmasked = [], []
    chained = _run(backbone, ["model.residual_grad_fusion=true"], batch, dtype, calls=calls, unmasked=unmasked)
    _assert_same_run(plain, chained)
    assert len(calls) == joints - (1 if backbone == "resnet18" else 2) - 1  # less layer1's and the one into layer2
    assert unmasked == ["bias_act"] * joints  # every inner block's output leaves its mask to the next block
    body = chained[0].backbone[0].body
    assert all(isinstance(getattr(body, f"layer{i}"), fold.ResidualGradChain) for i in (1, 2, 3, 4))
    assert isinstance(body, fold.ChainedLayerGetter)
    assert fold.fuse_residual_grad(copy.deepcopy(plain[0])) == joints


def test_chained_model_under_bf16_autocast():
    """Under bf16 autocast (the bias_act path of a CPU): the same bits too, the gradients summed in bf16 by both."""
    batch = make_batch(2, 64, 96, 7, "cpu", seed=4, max_targets=4)
    _assert_same_run(_run("resnet50", [], batch, torch.float32, amp=True),
                     _run("resnet50", ["model.residual_grad_fusion=true"], batch, torch.float32, amp=True))


def test_chained_model_with_conv_fusion(monkeypatch):
    """model.conv_fusion's path (cuDNN's fused operators, stood in for on the CPU by the plain math they fuse): the
    chained blocks' last convolutions run _ConvBiasReLU without its mask, and everything stays bit for bit."""
    def plain_forward(x, weight, bias, residual, stride, padding, dilation, groups):
        y = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return torch.relu(y + residual if residual is not None else y)
    monkeypatch.setattr(fold, "_cudnn_forward", plain_forward)
    monkeypatch.setattr(fold.FoldedConv2d, "uses_cudnn", lambda self, x: self.cudnn_fusion)
    batch = make_batch(2, 64, 96, 7, "cpu", seed=8, max_targets=4)
    extra = ["model.conv_fusion=true"]
    plain = _run("resnet50", extra, batch)
    calls, unmasked = [], []
    _assert_same_run(plain, _run("resnet50", extra + ["model.residual_grad_fusion=true"], batch, calls=calls,
                                 unmasked=unmasked))
    assert len(calls) == 3 + 5 + 2 + 2
    assert unmasked == ["cudnn"] * (3 + 5 + 2 + 2)  # layer1 (frozen) has no backward: cuDNN's operators directly


def test_chained_model_in_a_simulated_capture(monkeypatch):
    """With flat_cast, under a (simulated) CUDA graph capture TrunkFold lends the folded weights: the chain composes
    with it."""
    batch = make_batch(2, 64, 96, 7, "cpu", seed=5, max_targets=4)
    extra = ["model.flat_cast=true"]
    plain = _run("resnet50", extra, batch)
    monkeypatch.setattr(fold, "_capturing", lambda x: True)
    calls = []
    _assert_same_run(plain, _run("resnet50", extra + ["model.residual_grad_fusion=true"], batch, calls=calls))
    assert calls


def test_a_hooked_stage_runs_the_plain_path():
    """A forward hook on a block would see its unmasked output and may feed it to the loss: that stage then masks
    every block's own output, and the gradients stay right."""
    batch = make_batch(2, 64, 96, 7, "cpu", seed=6, max_targets=4)
    seen = []

    def hook(module, args, output):  # feeds the hooked block's output into the loss along another path
        seen.append(1)
        return output + 0.1 * output.tanh()
    plain = _run("resnet50", [], batch, hook=hook)
    calls = []
    chained = _run("resnet50", ["model.residual_grad_fusion=true"], batch, hook=hook, calls=calls)
    _assert_same_run(plain, chained)
    assert seen == [1, 1]
    assert len(calls) == 3 + 2  # layer2's and layer4's inner joints; not layer3's, nor those into and out of it


def test_returned_stages_and_stage_hooks_end_the_chain():
    """A trunk returning layer2 as a feature too (its output feeds the loss directly) keeps layer2's output masked:
    only the other joints are fused. A hook on a stage ends the chain at that stage as well. The gradients of every
    weight, layer1's included (all trainable here), equal those of the plain trunk bit for bit."""
    from torchvision.models import resnet50
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.ops.misc import FrozenBatchNorm2d

    def trunk(chained, hook=False):
        torch.manual_seed(0)
        net = resnet50(weights=None, norm_layer=FrozenBatchNorm2d).double()
        for m in net.modules():  # BatchNorm statistics away from identity
            if isinstance(m, FrozenBatchNorm2d):
                for name in ("weight", "bias", "running_mean"):
                    getattr(m, name).normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2)
        body = IntermediateLayerGetter(net, {"layer2": "mid", "layer4": "out"})
        fold.fold_frozen_bn(body)
        fold.fuse_bias_act(body)
        joints = fold.fuse_residual_grad(body) if chained else None
        if hook:
            body.layer3.register_forward_hook(lambda m, a, out: None)
        return body, joints

    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 64, 96, generator=gen, dtype=torch.float64)
    for hook, want_calls in ((False, 2 + 3 + 5 + 2 + 2), (True, 2 + 3 + 2 + 1)):
        results = []
        for chained in (False, True):
            body, joints = trunk(chained, hook)
            calls = []
            real = fold.relu_backward_sum
            fold.relu_backward_sum = lambda *a: calls.append(1) or real(*a)
            try:
                feats = body(x)
                (feats["mid"].sin().sum() + (feats["out"] * feats["out"]).sum()).backward()
            finally:
                fold.relu_backward_sum = real
            results.append(({n: p.grad for n, p in body.named_parameters()}, len(calls), joints))
        (g0, n0, _), (g1, n1, joints) = results
        assert joints == 2 + 3 + 5 + 2 + 2  # layer1 -> layer2 and layer3 -> layer4; layer2 is returned
        assert n0 == 0 and n1 == want_calls  # with the hook: layer3's inner joints and its two stage joints plain
        assert g0.keys() == g1.keys()
        for n in g0:
            assert torch.equal(g1[n], g0[n]), n


def test_state_dict_and_inference_unchanged():
    batch = make_batch(2, 64, 96, 7, "cpu", seed=7, max_targets=4)
    torch.manual_seed(0)
    _, plain, _ = build(OVER + ["model.backbone=resnet50"], "fast_fp32", "cpu")
    torch.manual_seed(1)
    _, chained, _ = build(OVER + ["model.backbone=resnet50", "model.residual_grad_fusion=true"], "fast_fp32", "cpu")
    assert list(plain.state_dict()) == list(chained.state_dict())
    chained.load_state_dict(plain.state_dict())
    plain.eval(), chained.eval()
    with torch.no_grad():
        assert torch.equal(plain(*batch[:2])["pred_boxes"], chained(*batch[:2])["pred_boxes"])


def test_config_needs_fused_bias_act():
    with pytest.raises(ConfigError, match="residual_grad_fusion needs model.fused_bias_act"):
        load_config(None, ["model.backbone=resnet50", "model.residual_grad_fusion=true"])
    load_config(None, ["model.backbone=resnet50", "model.fused_bias_act=true", "model.residual_grad_fusion=true"])
