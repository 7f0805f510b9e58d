"""model.flat_cast: one cast kernel for the transformer's and heads' matrix weights per forward (and one for their
gradients per backward) gives results bit-identical to plain autocast, and only then is it active."""
import copy
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from helpers import OpCounter

from detr_fast.config import load_config
from detr_fast.models import build_detr
from detr_fast.models.cast import _FlatCast, cast_targets, flat_cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_step import build, make_batch  # noqa: E402

OVER = ["model.num_classes=7", "model.backbone=resnet18", "model.hidden_dim=64", "model.nheads=2",
        "model.enc_layers=2", "model.dec_layers=3", "model.dim_feedforward=96", "model.num_queries=11"]


def _step(extra, seed, batch, amp=torch.bfloat16, count=False, grad=True, variant="fast", warm=False):
    """One forward + loss + backward of a bench_step variant (fast: fused attention core, folded trunk; ref_fp32:
    nn.MultiheadAttention's math, unfolded trunk) under CPU autocast; dropout drawn from `seed`."""
    torch.manual_seed(0)
    cfg, model, criterion = build(OVER + list(extra), variant, "cpu")
    images, mask, targets = batch
    counter = OpCounter()
    if warm:  # one forward first: the caches filled, so the count is of a later step
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            model(images, mask)
    torch.manual_seed(seed)
    with counter if count else nullcontext(), torch.set_grad_enabled(grad):
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            out = model(images, mask)
            losses = criterion(out, targets)
            total = sum(losses[k] * criterion.weight_dict[k] for k in losses)
        if grad:
            total.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return model, out, total.detach(), grads, counter.ops


@pytest.mark.parametrize("variant,extra", [("ref_fp32", ("model.dropout=0.1",)),
                                           ("fast", ("model.dropout=0.1",)),
                                           ("fast", ("model.fused_norm=true", "model.dropout=0.0")),
                                           ("fast", ("model.fused_bias_act=true", "model.packed_proj=true",
                                                     "model.dropout=0.1"))],
                         ids=["reference_attention", "fused_attention", "fused_norm", "fused_bias_act_packed"])
def test_flat_cast_is_bit_identical_to_autocast(variant, extra):
    """Same weights, batch and dropout draws: every output, the loss and every gradient are equal bit for bit."""
    batch = make_batch(2, 80, 112, 7, "cpu", seed=int(torch.randint(0, 1000, ())), max_targets=6)
    seed = int(torch.randint(0, 1000, ()))
    m1, o1, l1, g1, _ = _step(extra, seed, batch, variant=variant)
    m2, o2, l2, g2, _ = _step(extra + ("model.flat_cast=true",), seed, batch, variant=variant)
    assert not m1.flat_cast_targets and len(m2.flat_cast_targets) > 20
    assert torch.equal(l1, l2), (l1, l2)
    for key in ("pred_logits", "pred_boxes", "all_logits", "all_boxes"):
        assert o2[key].dtype == o1[key].dtype and torch.equal(o1[key], o2[key]), key
    assert g1.keys() == g2.keys() and len(g1) == sum(p.requires_grad for p in m1.parameters())
    for n in g1:
        assert g2[n].dtype == torch.float32 and torch.equal(g1[n], g2[n]), n
    # after the forward every module holds its own Parameter again
    for mod, name in m2.flat_cast_targets:
        assert isinstance(getattr(mod, name), torch.nn.Parameter)
    assert list(m1.state_dict()) == list(m2.state_dict())


def test_flat_cast_counts_two_cast_kernels_each_way():
    """The per-weight casts are gone: the cast count drops by at least one per target parameter in the forward and
    one per target in the backward, less the four kernels (concatenation and cast, each way) flat_cast adds."""
    batch = make_batch(2, 64, 96, 7, "cpu", seed=1, max_targets=4)
    m, _, _, _, plain = _step(("model.dropout=0.0",), 0, batch, count=True)
    _, _, _, _, flat = _step(("model.dropout=0.0", "model.flat_cast=true"), 0, batch, count=True)
    n = len(cast_targets([m.input_proj, m.transformer, m.class_embed, m.bbox_embed]))
    assert n > 40
    assert flat["aten._to_copy"] <= plain["aten._to_copy"] - 2 * n + 2
    assert flat["aten.cat"] == plain["aten.cat"] + 2


def test_flat_cast_is_a_no_op_without_autocast_or_in_fp64():
    batch = make_batch(2, 64, 80, 7, "cpu", seed=2, max_targets=3)
    _, o1, l1, g1, c1 = _step(("model.dropout=0.0",), 0, batch, amp=None, count=True, warm=True)
    _, o2, l2, g2, c2 = _step(("model.dropout=0.0", "model.flat_cast=true"), 0, batch, amp=None, count=True, warm=True)
    assert c1 == c2 and torch.equal(l1, l2) and all(torch.equal(g1[n], g2[n]) for n in g1)
    # a float64 model under autocast: autocast leaves fp64 alone, so does flat_cast
    model = build_detr(load_config(None, OVER + ["model.flat_cast=true", "model.dropout=0.0"])).double()
    images, mask, _ = batch
    counts = []
    for on in (True, False):
        model.use_flat_cast(on)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(images.double(), mask)  # fills the folded-BatchNorm caches
        with torch.autocast("cpu", dtype=torch.bfloat16), OpCounter() as c:
            out = model(images.double(), mask)
        assert out["pred_boxes"].dtype == torch.float64
        counts.append(c.ops)
    assert counts[0] == counts[1]


def test_flat_cast_in_eval_and_no_grad():
    batch = make_batch(2, 64, 80, 7, "cpu", seed=4, max_targets=3)
    _, o1, l1, _, _ = _step(("model.dropout=0.1",), 0, batch, grad=False)
    _, o2, l2, _, _ = _step(("model.dropout=0.1", "model.flat_cast=true"), 0, batch, grad=False)
    assert torch.equal(l1, l2) and torch.equal(o1["pred_boxes"], o2["pred_boxes"])
    model = build_detr(load_config(None, OVER + ["model.flat_cast=true"])).eval()
    ref = copy.deepcopy(model)
    ref.use_flat_cast(False)
    images, mask, _ = batch
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = model(images, mask), ref(images, mask)
    assert torch.equal(a["pred_logits"], b["pred_logits"])
    # the deep copy's targets are its own modules, not the original's
    assert all(mod is not orig for (mod, _), (orig, _) in zip(copy.deepcopy(model).flat_cast_targets,
                                                             model.flat_cast_targets))


def test_flat_cast_restores_parameters_when_the_forward_raises():
    model = build_detr(load_config(None, OVER + ["model.flat_cast=true"]))
    params = {n: p for n, p in model.named_parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError):
        model(torch.randn(1, 5, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))  # 5 channels: the stem refuses
    with pytest.raises(ValueError, match="boom"):
        with torch.autocast("cpu", dtype=torch.bfloat16), flat_cast(model.flat_cast_targets):
            assert getattr(*model.flat_cast_targets[0]).dtype == torch.bfloat16
            raise ValueError("boom")
    assert {n: p for n, p in model.named_parameters()} == params
    assert all(isinstance(getattr(m, n), torch.nn.Parameter) for m, n in model.flat_cast_targets)


def test_flat_cast_function_values_and_gradients():
    """Forward: each tensor rounded on its own (to bf16 and to fp16); backward: each gradient converted back, an
    unused output's gradient zero."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    shapes = [(7, 5), (5,), (1,), (3, 2, 3, 1), (0, 4), (6,)]
    params = [(torch.randn(s, generator=g) * 10).requires_grad_() for s in shapes]
    params[3] = params[3].detach().transpose(0, 1).requires_grad_()  # a non-contiguous input
    cl = (torch.randn(4, 3, 3, 5, generator=g) * 10).contiguous(memory_format=torch.channels_last).requires_grad_()
    params.append(cl)  # a channels_last weight: its copy and its gradient keep the layout
    for dtype in (torch.bfloat16, torch.float16):
        outs = _FlatCast.apply(dtype, *params)
        for p, o in zip(params, outs):
            assert o.shape == p.shape and o.dtype == dtype and torch.equal(o, p.detach().to(dtype))
        ups = [torch.randn(o.shape, generator=g).to(dtype) for o in outs]
        used = (0, 1, 3, 4, 5, 6)
        torch.autograd.backward([outs[i] for i in used], [ups[i].contiguous(memory_format=torch.channels_last)
                                                          if i == 6 else ups[i] for i in used])
        assert outs[-1].is_contiguous(memory_format=torch.channels_last)
        assert params[-1].grad.is_contiguous(memory_format=torch.channels_last)
        for i, p in enumerate(params):
            want = torch.zeros_like(p) if i == 2 else ups[i].float()
            assert p.grad.dtype == torch.float32 and torch.equal(p.grad, want), i
            p.grad = None
        assert len(outs) == len(params)


def test_flat_cast_targets_are_the_matrix_weights():
    model = build_detr(load_config(None, OVER))
    model.use_flat_cast()
    names = {f"{type(m).__name__}.{n}" for m, n in model.flat_cast_targets}
    assert names == {"Conv2d.weight", "Conv2d.bias", "Linear.weight", "Linear.bias",
                     "MultiheadAttention.in_proj_weight", "MultiheadAttention.in_proj_bias"}
    ids = [id(getattr(m, n)) for m, n in model.flat_cast_targets]
    assert len(ids) == len(set(ids))
    backbone = {id(p) for p in model.backbone.parameters()}
    assert not backbone & set(ids)
    norms = {id(p) for n, p in model.named_parameters() if "norm" in n or "query_embed" in n}
    assert not norms & set(ids)


@pytest.mark.needs_cuda
def test_flat_cast_on_cuda_bf16():
    """On a GPU under bf16 autocast: the forward is bit-identical (same loss), the gradients agree (bit for bit up to
    the order of atomics in cuDNN's weight gradients)."""
    images, mask, targets = make_batch(2, 96, 128, 7, "cuda", seed=6, max_targets=6)

    def run(flat):
        torch.manual_seed(0)
        _, model, criterion = build(OVER + ["model.dropout=0.1", f"model.flat_cast={str(flat).lower()}"], "fast",
                                    "cuda")
        torch.manual_seed(3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(images, mask)
            losses = criterion(out, targets)
            total = sum(losses[k] * criterion.weight_dict[k] for k in losses)
        total.backward()
        return total.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    (l1, g1), (l2, g2) = run(False), run(True)
    assert torch.equal(l1, l2), (l1, l2)
    assert g1.keys() == g2.keys()
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-5, atol=1e-7, msg=n)


def test_trunk_fold_in_a_capture_is_bit_identical(monkeypatch):
    """While a CUDA graph is captured the per-convolution caches are bypassed; with flat_cast the whole trunk's
    scales, shifts and frozen weights come from TrunkFold's few passes instead. Simulated here by declaring every
    tensor under capture: outputs, loss and gradients equal bit for bit, with far fewer operators in the forward;
    nothing stays lent afterwards."""
    from detr_fast.models import fold

    batch = make_batch(2, 64, 96, 7, "cpu", seed=8, max_targets=4)
    monkeypatch.setattr(fold, "_capturing", lambda x: True)
    runs = {}
    for flat in (False, True):
        for extra in ((), ("model.fused_bias_act=true",)):
            m, o, loss, g, ops = _step(extra + ("model.dropout=0.0", f"model.flat_cast={str(flat).lower()}"), 0,
                                       batch, count=True, warm=True)
            runs[flat, extra] = (o, loss, g, ops)
            assert all(c._lent is None for c in m.backbone.modules() if isinstance(c, fold.FoldedConv2d))
            assert (m.trunk_fold is not None) == flat
    # the trainable weights folded one product per weight each way, as before scale_many (the same values)
    monkeypatch.setattr(fold, "TRAINABLE_SCALE_MANY", False)
    extra = ("model.fused_bias_act=true",)
    _, o3, l3, g3, c3 = _step(extra + ("model.dropout=0.0", "model.flat_cast=true"), 0, batch, count=True, warm=True)
    runs["per_conv", extra] = (o3, l3, g3, c3)
    for extra in ((), ("model.fused_bias_act=true",)):
        (o1, l1, g1, c1), (o2, l2, g2, c2) = runs[False, extra], runs[True, extra]
        assert torch.equal(l1, l2) and torch.equal(o1["all_boxes"], o2["all_boxes"])
        assert g1.keys() == g2.keys() and all(torch.equal(g1[n], g2[n]) for n in g1)
        assert c2["aten.rsqrt"] == 1 and c1["aten.rsqrt"] > 15
        assert sum(c2.values()) < sum(c1.values()) - 60
        # the trainable weights (resnet18's layers 2-4: 15 convolutions) in one launch forward, one backward
        assert c2["detr_fast.scale_many"] == 2 and c1.get("detr_fast.scale_many", 0) == 0
    o3, l3, g3, c3 = runs["per_conv", extra]
    assert torch.equal(l3, l2) and all(torch.equal(g3[n], g2[n]) for n in g2)
    assert c3.get("detr_fast.scale_many", 0) == 0 and c3["aten.mul"] >= c2["aten.mul"] + 2 * 15


def test_trunk_fold_stands_aside_outside_a_capture():
    """Eager forwards keep the per-convolution caches: TrunkFold lends nothing and adds no operators."""
    batch = make_batch(2, 64, 96, 7, "cpu", seed=9, max_targets=4)
    _, _, l1, g1, c1 = _step(("model.dropout=0.0", "model.flat_cast=true"), 0, batch, count=True, warm=True)
    _, _, l2, g2, c2 = _step(("model.dropout=0.0",), 0, batch, count=True, warm=True)
    assert torch.equal(l1, l2)
    assert c1["aten.rsqrt"] == c2["aten.rsqrt"] == 0  # cached scales: no BatchNorm arithmetic at all
