"""model.fused_bias_act: the folded ResNet trunk with each conv's bias, ReLUs and residual adds as bias_act calls
computes the unfused trunk's function (outputs and gradients), keeps its state dict, and its cached folded
scale/shift/weight never go stale."""
import copy

import pytest
import torch
from helpers import OpCounter, randomize_frozen_bn

from detr_fast.config import ConfigError, load_config
from detr_fast.criterion import build_criterion
from detr_fast.models import build_detr
from detr_fast.models.backbone import Backbone
from detr_fast.models.fold import BiasActBlock, FoldedConv2d, fold_frozen_bn, fuse_bias_act, fuse_conv_relu

pytestmark = pytest.mark.filterwarnings("ignore:detr_fast.ops.bias_act")


def _trunks(name, dtype, channels_last=False):
    """(plain, folded, folded + fused) trunks with the same weights and random BN statistics."""
    torch.manual_seed(0)
    plain = Backbone(name, train_backbone=True, frozen_bn=True).body
    randomize_frozen_bn(plain, 1)
    folded = copy.deepcopy(plain)
    fold_frozen_bn(folded)
    fused = copy.deepcopy(folded)
    assert fuse_bias_act(fused) == 1 + (8 if name == "resnet18" else 16)  # the stem and every block
    nets = [m.to(dtype) for m in (plain, folded, fused)]
    if channels_last:
        nets = [m.to(memory_format=torch.channels_last) for m in nets]
    return nets


def _run(net, x, r):
    """Output and the gradients (input and every trainable parameter) of <net(x), r>."""
    x = x.detach().clone().requires_grad_(True)
    out = net(x)["0"]
    (out * r).sum().backward()
    grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


F64, F32 = (torch.float64, 1e-10), (torch.float32, 1e-5)  # dtype, relative tolerance


# resnet50 is slow on a CPU: one case per dtype. Its float32 gradients are not compared: of its over a million ReLU
# inputs in the trainable layers a few lie within float32 rounding of zero, and where two computations (equal in exact
# arithmetic) round one to opposite sides, the gradient routed through it moves whole weight gradients by percents (in
# about half of random draws). float64 checks them; resnet18 has few enough such inputs for float32.
@pytest.mark.parametrize("name,dtype,rtol,channels_last,check_grads", [
    pytest.param(name, *dt, cl, name == "resnet18" or dt is F64,
                 id=f"{name}-{str(dt[0]).split('.')[-1]}-{'nhwc' if cl else 'nchw'}")
    for name, dt, cl in [("resnet18", F64, False), ("resnet18", F64, True), ("resnet18", F32, False),
                         ("resnet18", F32, True), ("resnet50", F64, False), ("resnet50", F32, True)]])
def test_fused_trunk_matches_unfused(name, dtype, rtol, channels_last, check_grads):
    plain, folded, fused = _trunks(name, dtype, channels_last)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 67, 95, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        r = torch.randn(folded(x)["0"].shape, generator=g).to(dtype)
    out_p, dx_p, g_p = _run(plain, x, r)
    for _ in range(2):  # the second pass runs on the cached scale, shift and frozen weights
        for net in (folded, fused):
            net.zero_grad(set_to_none=True)
        out_f, dx_f, g_f = _run(folded, x, r)
        out, dx, grads = _run(fused, x, r)
        torch.testing.assert_close(out, out_f, rtol=rtol, atol=rtol * out_f.abs().max())
        torch.testing.assert_close(out, out_p, rtol=rtol, atol=rtol * out_p.abs().max())
        assert grads.keys() == g_f.keys() == g_p.keys() and len(grads) > 0
        assert not any(n.startswith(("conv1", "layer1")) for n in grads)  # the stem and layer1 stay frozen
        if not check_grads:
            continue
        if dtype == torch.float64:  # in float32 a rounding flips near-ties of the max-pool, which routes dx elsewhere
            torch.testing.assert_close(dx, dx_f, rtol=rtol, atol=rtol * dx_f.abs().max())
            torch.testing.assert_close(dx, dx_p, rtol=rtol, atol=rtol * dx_p.abs().max())
        for n in grads:
            tol = rtol * g_f[n].abs().max()
            torch.testing.assert_close(grads[n], g_f[n], rtol=rtol, atol=tol, msg=n)
            torch.testing.assert_close(grads[n], g_p[n], rtol=rtol, atol=tol, msg=n)
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(fused.layer2[0], BiasActBlock) and fused.layer2[0].downsample is not None
    assert fused.state_dict().keys() == plain.state_dict().keys()


def _small_detr(fused):
    sets = ["model.backbone=resnet18", "model.hidden_dim=32", "model.nheads=4", "model.enc_layers=1",
            "model.dec_layers=2", "model.dim_feedforward=64", "model.num_queries=6", "model.num_classes=3",
            "model.dropout=0.0", "model.kernels=reference", f"model.fused_bias_act={str(fused).lower()}"]
    return load_config(None, sets)


def _targets():
    g = torch.Generator().manual_seed(4)
    boxes = torch.cat((torch.rand(2, 3, 2, generator=g) * 0.6 + 0.2, torch.rand(2, 3, 2, generator=g) * 0.3 + 0.05), -1)
    boxes[1, 2] = 0.0  # the second image has two targets, padded to three
    return {"labels": torch.tensor([[0, 2, 1], [1, 0, 0]]), "boxes": boxes, "num_targets": torch.tensor([3, 2])}


def test_detr_with_fused_bias_act_equals_plain():
    torch.manual_seed(0)
    plain = build_detr(_small_detr(False)).double()
    fused = build_detr(_small_detr(True)).double()
    assert sum(isinstance(m, BiasActBlock) for m in fused.modules()) == 8
    assert not any(isinstance(m, BiasActBlock) for m in plain.modules())
    randomize_frozen_bn(plain, 3)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    fused.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(fused.state_dict(), strict=True)  # and back
    crit = build_criterion(_small_detr(False))
    g = torch.Generator().manual_seed(5)
    images = torch.randn(2, 3, 67, 95, generator=g, dtype=torch.float64)
    mask = torch.zeros(2, 67, 95, dtype=torch.bool)
    mask[1, 50:] = True
    mask[1, :, 70:] = True
    targets = _targets()
    res = []
    for model in (plain, fused):
        out = model(images, mask)
        losses = crit(out, targets)
        total = sum(losses[k] * crit.weight_dict[k] for k in losses)
        total.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        res.append((out, float(total.detach()), grads))
    (a, la, ga), (b, lb, gb) = res
    for k in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(b[k], a[k], rtol=1e-10, atol=1e-12)
    assert abs(la - lb) <= 1e-6 * abs(la)
    assert ga.keys() == gb.keys() and any(n.startswith("backbone.0.body.layer4") for n in ga)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-5, atol=1e-7 * ga[n].abs().max(), msg=n)


def test_cache_follows_state_dict_dtype_and_in_place_writes():
    """The cached scale, shift and folded frozen weights are recomputed whenever their sources change."""
    torch.manual_seed(0)
    plain = Backbone("resnet18", train_backbone=True, frozen_bn=True).body
    randomize_frozen_bn(plain, 1)
    other = copy.deepcopy(plain)
    randomize_frozen_bn(other, 7)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    fused = copy.deepcopy(plain)
    fold_frozen_bn(fused)
    fuse_bias_act(fused)
    x = torch.randn(2, 3, 67, 95, generator=torch.Generator().manual_seed(8))

    def check(ref):
        with torch.no_grad():
            want = ref(x)["0"]
            torch.testing.assert_close(fused(x)["0"], want, rtol=1e-5, atol=1e-5 * want.abs().max())

    check(plain)
    fused.load_state_dict(other.state_dict())  # new statistics and frozen weights: in-place copies
    check(other)
    fused.load_state_dict(plain.state_dict())
    check(plain)
    with torch.no_grad():  # an in-place write into one buffer and one frozen weight
        plain.layer1[0].bn2.running_var.mul_(3.0)
        fused.layer1[0].bn2.running_var.mul_(3.0)
        plain.conv1.weight.mul_(0.5)
        fused.conv1.weight.mul_(0.5)
    check(plain)
    plain.double()  # .double(): new tensors of another dtype
    fused.double()
    xd = x.double()
    with torch.no_grad():
        out = fused(xd)["0"]
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, plain(xd)["0"], rtol=1e-10, atol=1e-10)
    conv = fused.layer1[0].conv1
    assert conv._cache["scale_shift"][1][1].dtype == torch.float64
    assert "weight" in conv._cache and conv._cache["weight"][1].dtype == torch.float64  # frozen: cached
    assert "weight" not in fused.layer3[0].conv1._cache  # trainable: W * scale every forward (for its gradient)
    # nothing cached reaches the state dict
    assert fused.state_dict().keys() == plain.state_dict().keys()


def test_cache_survives_inference_mode_and_is_bypassed_when_compiling(monkeypatch):
    torch.manual_seed(0)
    body = Backbone("resnet18", train_backbone=True, frozen_bn=True).body
    randomize_frozen_bn(body, 1)
    fold_frozen_bn(body)
    fuse_bias_act(body)
    x = torch.randn(1, 3, 35, 41)
    with torch.inference_mode():  # the first forward fills the caches in inference mode ...
        ref = body(x)["0"]
    out = body(x)["0"]  # ... which a training forward can still save for backward
    out.sum().backward()
    torch.testing.assert_close(out.detach(), ref)
    assert body.layer3[0].conv1.weight.grad is not None
    body2 = copy.deepcopy(body)
    for m in body2.modules():
        if isinstance(m, FoldedConv2d):
            m._cache.clear()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        torch.testing.assert_close(body2(x)["0"], ref)
    assert not any(m._cache for m in body2.modules() if isinstance(m, FoldedConv2d))


def test_cached_folded_conv_dispatches_only_the_convolution():
    torch.manual_seed(0)
    body = Backbone("resnet18", train_backbone=True, frozen_bn=True).body
    fold_frozen_bn(body)
    frozen, trainable = body.layer1[0].conv1, body.layer3[0].conv1
    for conv, cin, expect in ((frozen, 64, {"aten.convolution": 1}),
                              (trainable, 128, {"aten.convolution": 1, "aten.mul": 1})):
        x = torch.randn(1, cin, 9, 11)
        conv(x)
        with OpCounter() as c:
            conv(x)
        assert dict(c.ops) == expect
        xb = x.bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the casts autocast would do are cached
            conv(xb)
            with OpCounter() as c:
                y = conv(xb)
        assert y.dtype == torch.bfloat16
        # a trainable weight: folded and cast by one product written in bf16 (empty_like only allocates)
        assert dict(c.ops) == (expect if conv is frozen else {**expect, "aten.empty_like": 1})


@pytest.mark.parametrize("channels_last", [False, True])
def test_trainable_fold_and_cast_in_one_product_is_exact(channels_last):
    """Under autocast a trainable folded weight is W * scale written in bf16 by one kernel, and its gradient
    g * scale written in fp32 by one: bit for bit what W * scale then autocast's cast, and autograd through them,
    give; the memory format is kept."""
    from detr_fast.models.fold import _fold_trainable

    g = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    w = torch.randn(24, 10, 3, 3, generator=g)
    if channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
    scale = torch.rand(24, 1, 1, 1, generator=g) + 0.5
    up = torch.randn(24, 10, 3, 3, generator=g).bfloat16()
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    ours = _fold_trainable(w1, scale, torch.bfloat16)
    plain = (w2 * scale).to(torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, plain)
    if channels_last:
        assert ours.is_contiguous(memory_format=torch.channels_last)
    ours.backward(up)
    plain.backward(up)
    assert w1.grad.dtype == torch.float32 and torch.equal(w1.grad, w2.grad)
    # no autocast dtype change: the plain product
    assert torch.equal(_fold_trainable(w, scale, torch.float32), w * scale)


def test_fuse_bias_act_needs_folded_resnet_config():
    assert load_config(None, ["model.backbone=resnet18", "model.fused_bias_act=true"]).model.fused_bias_act
    for bad in (["model.fold_bn=false"], ["model.frozen_bn=false"], ["model.backbone=light"]):
        with pytest.raises(ConfigError, match="model.fused_bias_act needs"):
            load_config(None, ["model.fused_bias_act=true"] + bad)
    model = build_detr(load_config(None, ["model.backbone=resnet18", "model.fused_bias_act=true", "model.hidden_dim=32",
                                          "model.nheads=4", "model.enc_layers=1", "model.dec_layers=1",
                                          "model.dim_feedforward=64"]))
    body = model.backbone[0].body
    assert body.conv1.fused_relu and isinstance(body.relu, torch.nn.Identity)
    assert fuse_bias_act(body) == 0  # already fused


def test_conv_fusion_marks_the_trunk_and_leaves_the_cpu_path_alone():
    """model.conv_fusion marks the fused stem and every block's convolutions; on the CPU the cuDNN path never runs:
    outputs and gradients are those of the model without the option, bit for bit."""
    for bad in ([], ["model.fused_bias_act=false"]):
        with pytest.raises(ConfigError, match="model.conv_fusion needs"):
            load_config(None, ["model.conv_fusion=true"] + bad)
    torch.manual_seed(0)
    plain = build_detr(_small_detr(True)).double()
    sets = _small_detr(True)
    sets.model.conv_fusion = True
    fused = build_detr(sets).double()
    randomize_frozen_bn(plain, 6)
    fused.load_state_dict(plain.state_dict(), strict=True)
    marked = [n for n, m in fused.named_modules() if getattr(m, "cudnn_fusion", False)]
    assert len(marked) == 1 + 8 * 2 and not any("downsample" in n for n in marked)  # resnet18: the stem, 8 blocks
    assert not any(getattr(m, "cudnn_fusion", False) for m in plain.modules())
    assert fuse_conv_relu(fused) == len(marked)  # marking twice is harmless
    x = torch.randn(2, 3, 67, 95, dtype=torch.float64)
    assert not fused.backbone[0].body.conv1.uses_cudnn(x)  # a CPU tensor
    crit = build_criterion(_small_detr(False))
    mask = torch.zeros(2, 67, 95, dtype=torch.bool)
    res = []
    for model in (plain, fused):
        out = model(x, mask)
        total = sum(v * crit.weight_dict[k] for k, v in crit(out, _targets()).items())
        total.backward()
        res.append((out["pred_boxes"], {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = res
    assert torch.equal(a, b) and ga.keys() == gb.keys()
    assert all(torch.equal(ga[n], gb[n]) for n in ga)


def _reference_forward(calls):
    """A stand-in for cuDNN's fused operators (the CPU has none): relu(conv2d(x, w, b) + residual), counting calls."""
    def forward(x, weight, bias, residual, stride, padding, dilation, groups):
        calls.append(residual is not None)
        y = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return torch.relu(y + residual if residual is not None else y)
    return forward


@pytest.mark.parametrize("stride,residual,channels_last", [(1, False, False), (2, True, False), (1, True, True),
                                                           (2, False, True)])
def test_conv_bias_relu_backward_gradcheck(monkeypatch, stride, residual, channels_last):
    """The backward the fused operators are given (_ConvBiasReLU), in float64 against numerical derivatives, with
    the forward stood in for by the plain math it fuses; every subset of inputs that needs a gradient."""
    from detr_fast.models import fold

    calls = []
    monkeypatch.setattr(fold, "_cudnn_forward", _reference_forward(calls))
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    out_hw = ((5 + 2 - 3) // stride + 1, (7 + 2 - 3) // stride + 1)
    r = torch.randn(2, 4, *out_hw, generator=g, dtype=torch.float64) if residual else None
    if channels_last:
        x, r = x.contiguous(memory_format=torch.channels_last), r.contiguous(
            memory_format=torch.channels_last) if r is not None else None
    for needs in [(True, True, True, True), (False, True, False, False), (True, False, False, True)]:
        args = [t.detach().clone().requires_grad_(n) if t is not None else None for t, n in zip((x, w, b, r), needs)]
        assert torch.autograd.gradcheck(
            lambda *a: fold._ConvBiasReLU.apply(*a, (stride, stride), (1, 1), (1, 1), 1), tuple(args))
    assert calls and all(c == residual for c in calls)


def test_conv_fusion_trunk_equals_bias_act_trunk(monkeypatch):
    """The whole control flow of model.conv_fusion on the CPU, the cuDNN operators stood in for by the plain math:
    the stem and layer1 (frozen, and with an input that needs no gradient) call them directly, the trainable blocks
    through _ConvBiasReLU, a downsample's bias joined to the block's last convolution. Output, input gradient and
    every trainable gradient equal those of the bias_act trunk in float64."""
    from detr_fast.models import fold

    calls = []
    monkeypatch.setattr(fold, "_cudnn_forward", _reference_forward(calls))
    monkeypatch.setattr(FoldedConv2d, "uses_cudnn", lambda self, x: self.cudnn_fusion)
    applied = []
    real_apply = fold._ConvBiasReLU.apply
    monkeypatch.setattr(fold._ConvBiasReLU, "apply", lambda *a: applied.append(1) or real_apply(*a))
    plain, _, fused = _trunks("resnet50", torch.float64)
    conv = copy.deepcopy(fused)
    assert fuse_conv_relu(conv) == 1 + 16 * 3
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 67, 95, generator=g, dtype=torch.float64)
    with torch.no_grad():
        r = torch.randn(fused(x)["0"].shape, generator=g, dtype=torch.float64)
    results = []
    for net in (fused, conv):
        calls.clear()
        applied.clear()
        xx = x.clone().requires_grad_(False)
        out = net(xx)["0"]
        (out * r).sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in net.named_parameters() if p.grad is not None},
                        len(calls), len(applied)))
    (out_b, g_b, n_b, a_b), (out_c, g_c, n_c, a_c) = results
    assert (n_b, a_b) == (0, 0)
    assert n_c == 1 + 16 * 3 and a_c == 13 * 3  # every convolution fused; layers 2-4 (13 blocks) with a backward
    torch.testing.assert_close(out_c, out_b, rtol=1e-10, atol=1e-12)
    assert g_c.keys() == g_b.keys() and len(g_b) > 0
    for n in g_b:
        torch.testing.assert_close(g_c[n], g_b[n], rtol=1e-9, atol=1e-12 * g_b[n].abs().max(), msg=n)
    with torch.no_grad():  # evaluation: no call needs a backward
        applied.clear()
        torch.testing.assert_close(conv(x)["0"], out_b, rtol=1e-10, atol=1e-12)
        assert not applied


@pytest.mark.needs_cuda
@pytest.mark.parametrize("amp", ["fp32", "bf16"])
def test_conv_bias_relu_on_gpu(amp, monkeypatch):
    """cuDNN's fused operators with the backward of _ConvBiasReLU on the GPU: output and the gradients of x, weight
    and residual against float64 on the CPU err at most twice what the unfused math errs in the same precision."""
    from detr_fast.models import fold

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    dtype = torch.float32 if amp == "fp32" else torch.bfloat16
    g = torch.Generator().manual_seed(13)
    # small enough that no pre-activation is likely to lie within float32 rounding of zero (a ReLU flipped by
    # rounding moves a weight gradient by about 1e-3, far over float32's error; bf16's error covers its flips)
    for residual, stride, channels_last in [(True, 1, True), (False, 2, True), (True, 2, False)]:
        x = torch.randn(2, 16, 13, 17, generator=g)
        w = torch.randn(32, 16, 3, 3, generator=g) / 12
        b = torch.randn(32, generator=g) * 0.1
        out_hw = ((13 - 1) // stride + 1, (17 - 1) // stride + 1)
        r = torch.randn(2, 32, *out_hw, generator=g) if residual else None
        go = torch.randn(2, 32, *out_hw, generator=g)

        def run(fn, device, dt):
            ts = [t.to(device, dt) if t is not None else None for t in (x, w, b, r)]
            if channels_last:
                ts = [t.contiguous(memory_format=torch.channels_last) if t is not None and t.dim() == 4 else t
                      for t in ts]
            ts = [t.requires_grad_(True) if t is not None else None for t in ts]
            out = fn(*ts)
            out.backward(go.to(device, dt))
            return [out.detach().double().cpu()] + [t.grad.double().cpu() for t in ts if t is not None]

        def plain(x_, w_, b_, r_):
            y = torch.nn.functional.conv2d(x_, w_, b_, stride, 1)
            return torch.relu(y + r_ if r_ is not None else y)

        def fused(x_, w_, b_, r_):
            return fold._ConvBiasReLU.apply(x_, w_, b_, r_, (stride, stride), (1, 1), (1, 1), 1)

        ref = run(plain, "cpu", torch.float64)
        low = run(plain, "cuda", dtype)
        got = run(fused, "cuda", dtype)
        for name, a, l, e in zip(("out", "x", "w", "b", "r"), got, low, ref):
            err = float((a - e).norm() / e.norm())
            assert err <= 2 * float((l - e).norm() / e.norm()) + 1e-7, (name, residual, stride, channels_last)


def _conv_fused_trunk(channels_last):
    """(bias_act trunk, the same with fuse_conv_relu) on the GPU, and the plain trunk in float64 on the CPU."""
    plain, _, fused = _trunks("resnet50", torch.float32, channels_last)
    conv = copy.deepcopy(fused)
    assert fuse_conv_relu(conv) == 1 + 16 * 3  # the stem and 16 blocks
    return fused.cuda(), conv.cuda(), plain.double()


@pytest.mark.needs_cuda
@pytest.mark.parametrize("amp", ["fp32", "bf16"])
def test_conv_fusion_trunk_on_gpu(amp, monkeypatch):
    """On a GPU every trunk convolution runs as cuDNN's fused convolution + bias (+ residual) + ReLU: the stem and
    each block's inner convolutions through cudnn_convolution_relu, each block's last through
    cudnn_convolution_add_relu, in training and in evaluation. The trunk's output, against the float64 plain trunk,
    errs at most twice what the bias_act path errs (fp32 with TF32 off; bf16 autocast)."""
    calls = {"relu": 0, "add_relu": 0}
    relu, add_relu = torch.cudnn_convolution_relu, torch.cudnn_convolution_add_relu

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(torch, "cudnn_convolution_relu", count("relu", relu))
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", count("add_relu", add_relu))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)

    def err(a, b):
        return float((a - b).norm() / b.norm())

    for channels_last in (False, True):
        fused, conv, ref = _conv_fused_trunk(channels_last)
        g = torch.Generator().manual_seed(7)
        x = torch.randn(2, 3, 97, 131, generator=g)
        with torch.no_grad():
            r = torch.randn(ref(x.double())["0"].shape, generator=g)

        def run(net, device, dtype):
            xx = x.to(device, dtype)
            if channels_last:
                xx = xx.contiguous(memory_format=torch.channels_last)
            net.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp == "bf16" and device == "cuda"):
                out = net(xx)["0"]
            (out.double() * r.to(device, torch.float64)).sum().backward()
            return out.double().cpu(), {n: p.grad.double().cpu() for n, p in net.named_parameters()
                                        if p.grad is not None}

        out_ref, g_ref = run(ref, "cpu", torch.float64)
        before = dict(calls)
        out_b, g_b = run(fused, "cuda", torch.float32)
        assert calls == before  # the bias_act trunk never takes the cuDNN path
        out_c, g_c = run(conv, "cuda", torch.float32)
        assert calls["relu"] - before["relu"] == 1 + 16 * 2 and calls["add_relu"] - before["add_relu"] == 16
        assert err(out_c, out_ref) <= 2 * err(out_b, out_ref) + 1e-7, (err(out_c, out_ref), err(out_b, out_ref))
        # the gradients' values are checked layer by layer (test_conv_bias_relu_on_gpu) and for the whole trunk in
        # float64 (test_conv_fusion_trunk_equals_bias_act_trunk): in float32 and bf16 a rounding difference can move
        # a ReLU input of resnet50 across zero and reroute whole weight gradients (test_fused_trunk_matches_unfused)
        assert g_c.keys() == g_b.keys() == g_ref.keys() and not any(n.startswith(("conv1", "layer1")) for n in g_c)
        assert all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in g_c.values())
        before = dict(calls)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp == "bf16"):
            xx = x.cuda()
            if channels_last:
                xx = xx.contiguous(memory_format=torch.channels_last)
            out_e, out_eb = conv(xx)["0"], fused(xx)["0"]
        assert calls["relu"] - before["relu"] == 1 + 16 * 2 and calls["add_relu"] - before["add_relu"] == 16
        with torch.no_grad():
            ref_e = ref(x.double())["0"]
        assert err(out_e.double().cpu(), ref_e) <= 2 * err(out_eb.double().cpu(), ref_e) + 1e-7
        if channels_last:
            assert out_e.is_contiguous(memory_format=torch.channels_last)
