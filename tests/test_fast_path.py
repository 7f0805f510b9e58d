"""The fast path computes the reference path's function: same losses and gradients on the same weights and batch."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_step import build, make_batch  # noqa: E402

OVER = ["model.num_classes=7", "model.backbone=resnet18", "model.hidden_dim=64", "model.nheads=2",
        "model.enc_layers=2", "model.dec_layers=3", "model.dim_feedforward=128", "model.num_queries=12",
        "model.dropout=0.0"]


def _loss_and_grads(variant, state, batch, extra=()):
    cfg, model, criterion = build(OVER + list(extra), variant, "cpu")
    model.load_state_dict(state, strict=True)
    images, mask, targets = batch
    out = model(images, mask)
    losses = criterion(out, targets)
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in losses.items()}, grads


@pytest.mark.parametrize("extra", [(), ("model.fused_norm=true",), ("model.fused_bias_act=true",),
                                   ("model.packed_proj=true",),
                                   ("model.fused_norm=true", "model.fused_bias_act=true", "model.packed_proj=true",
                                    "model.fused_ffn=true", "model.residual_grad_fusion=true")],
                         ids=["plain", "fused_norm", "fused_bias_act", "packed_proj", "fused_all"])
def test_fast_path_equals_reference_path_in_fp32(extra):
    torch.manual_seed(0)
    _, base, _ = build(OVER, "ref_fp32", "cpu")
    state = base.state_dict()
    batch = make_batch(2, 96, 128, 7, "cpu", seed=3, max_targets=5)
    ref_losses, ref_grads = _loss_and_grads("ref_fp32", state, batch)
    # the fast path without bf16 autocast: our kernels, fused attention (C++ kernel), folded BatchNorm
    fast_losses, fast_grads = _loss_and_grads("fast_fp32", state, batch, extra)
    assert ref_losses.keys() == fast_losses.keys()
    for k in ref_losses:
        assert abs(fast_losses[k] - ref_losses[k]) <= 1e-4 * max(abs(ref_losses[k]), 1e-3), k
    assert ref_grads.keys() == fast_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(fast_grads[n], ref_grads[n], rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.parametrize("extra", [(), ("model.fused_norm=true", "model.fused_bias_act=true", "model.flat_cast=true",
                                        "model.packed_proj=true", "model.fused_ffn=true")],
                         ids=["plain", "fused_all"])
def test_fast_path_in_bf16_equals_reference_to_rounding(extra):
    """The fast step as it runs (bf16 autocast, our kernels, folded and fused trunk): its loss differs from the fp32
    reference's by at most twice what the reference itself moves under bf16 autocast (the low-precision rule of
    STYLE.md), plus 1e-3 relative."""
    from bench_step import eval_loss

    torch.manual_seed(0)
    _, base, _ = build(OVER, "ref_fp32", "cpu")
    state = base.state_dict()
    batch = make_batch(2, 96, 128, 7, "cpu", seed=3, max_targets=5)

    def loss(variant, amp, more=()):
        _, model, criterion = build(OVER + list(more), variant, "cpu")
        model.load_state_dict(state, strict=True)
        return eval_loss(model, criterion, amp, "cpu", *batch)

    ref = loss("ref_fp32", "none")
    ref_low = loss("ref_fp32", "bf16")
    fast = loss("fast", "bf16", extra)
    assert abs(fast - ref) <= 2 * abs(ref_low - ref) + 1e-3 * abs(ref), (fast, ref, ref_low)


class _NoHostReads(torch.overrides.TorchFunctionMode):
    """Fails on Python-level calls that read a tensor's value on the host (each would sync a CUDA device)."""

    BANNED = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
              torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.BANNED:
            raise AssertionError(f"host read of a step tensor: {getattr(func, '__name__', func)}")
        return func(*args, **(kwargs or {}))


def _step(variant, batch, extra=(), amp=False):
    torch.manual_seed(0)
    cfg, model, criterion = build(OVER + list(extra), variant, "cpu")
    images, mask, targets = batch
    with _NoHostReads(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = model(images, mask)
        losses = criterion(out, targets)
        total = sum(losses[k] * criterion.weight_dict[k] for k in losses)
        total.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 0.1)


def test_fast_step_reads_nothing_back_to_the_host():
    batch = make_batch(2, 64, 96, 7, "cpu", seed=5, max_targets=4)
    _step("fast_fp32", batch)  # our kernels: no host read anywhere in forward, loss, backward, clipping
    # fused norm and FFN activation, dropout drawn too
    _step("fast_fp32", batch, ("model.fused_norm=true", "model.fused_ffn=true", "model.dropout=0.1"))
    _step("fast_fp32", batch, ("model.fused_bias_act=true",))  # fused trunk, its cached folded BatchNorm
    _step("fast_fp32", batch, ("model.fused_bias_act=true", "model.residual_grad_fusion=true"))  # chained stages
    # bf16 autocast with the one-pass weight cast and the packed projections
    _step("fast", batch, ("model.flat_cast=true", "model.packed_proj=true"), amp=True)
    _step("fast", batch, ("model.flat_cast=true", "model.bias_grad_mm=true"), amp=True)  # bias grads as products
    # the detector does catch the reference path's matcher (scipy on host copies)
    with pytest.raises(AssertionError, match="host"):
        _step("ref_fp32", batch)


def test_bench_step_counts_operators(tmp_path):
    """bench_step --count-ops on the CPU: the one-pass weight cast and the packed projections dispatch fewer operators
    and casts than the plain fast step, the reference step the most."""
    import json

    import bench_step

    out = tmp_path / "rows.json"
    assert bench_step.main(["--device", "cpu", "--small", "--size", "64x96", "--variants", "ref_tf32,fast,fast_fused",
                            "--iters", "1", "--warmup", "1", "--count-ops", "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    ref, fast, fused = rows["ref_tf32"], rows["fast"], rows["fast_fused"]
    assert ref["compute_ops"] > fast["compute_ops"] > fused["compute_ops"] > 0
    assert fast["casts"] > 2 * fused["casts"]
    assert all(r["ops"] >= r["compute_ops"] for r in rows.values())


@pytest.mark.parametrize("extra", [("model.fused_norm=true", "model.fused_bias_act=true", "model.flat_cast=true",
                                    "model.packed_proj=true", "model.fused_ffn=true", "model.residual_grad_fusion=true")],
                         ids=["fused_all"])
def test_whole_model_under_torch_compile(extra):
    """torch.compile (aot_eager: Dynamo and AOTAutograd, no code generation) traces the fast model with every fusion
    under bf16 autocast: its caches and one-pass casts stand aside while tracing; loss and gradients equal the eager
    model's."""
    torch._dynamo.reset()
    batch = make_batch(2, 64, 96, 7, "cpu", seed=12, max_targets=4)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        cfg, model, criterion = build(OVER + list(extra), "fast_fp32", "cpu")
        fn = torch.compile(model, backend="aot_eager") if compiled else model
        images, mask, targets = batch
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(images, mask)
            losses = criterion(out, targets)
        total = sum(losses[k] * criterion.weight_dict[k] for k in losses)
        total.backward()
        results.append((total.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (l1, g1), (l2, g2) = results
    # aot_eager runs the same aten operators with the same values: equal bit for bit (the compiled model casts each
    # weight where the eager one casts them all at once, which is the same rounding)
    assert torch.equal(l2, l1), (l1, l2)
    assert g1.keys() == g2.keys()
    for n in g1:
        assert torch.equal(g2[n], g1[n]), n


def test_bench_step_mixed_shapes(monkeypatch):
    """bench_step --mixed: batches of different shapes; an eager step sees each batch as drawn, a graph variant each
    batch padded up to the buckets (every pixel and target row kept, padding masked), one capture per padded shape
    and replays after it. The graph is stood in for on the CPU by a recorder that runs the step it wraps."""
    import bench_step

    batches = bench_step.make_mixed_batches(6, 2, 80, 120, 7, "cpu", seed=3)
    shapes = {tuple(b[0].shape) for b in batches}
    assert len(shapes) > 1 and all(h <= 80 and w <= 120 for _, _, h, w in shapes)
    buckets = bench_step.default_buckets(80, 120)
    assert buckets == sorted(buckets) and {80, 120} <= set(buckets) and buckets[0] >= 48

    seen = []

    def step(images, mask, targets):
        seen.append((tuple(images.shape), tuple(targets["labels"].shape)))
        return images.sum()

    m = bench_step.time_mixed(step, batches, "cpu", reps=2)
    assert seen == [(tuple(b[0].shape), tuple(b[2]["labels"].shape)) for b in batches] * 3
    assert m["pad"] == 1.0 and m["graphs"] == 0 and m["img_per_s"] > 0

    captured, replayed = [], []

    class Recorder:  # GraphedStep's contract: warm-up steps on the example inputs, then replays of new inputs
        def __init__(self, fn, inputs, warmup=3, pool=None):
            self.fn, self.shapes = fn, [tuple(t.shape) for t in (inputs[0], inputs[1], inputs[2]["labels"])]
            captured.append(self.shapes)
            for _ in range(warmup):
                fn(*inputs)

        def __call__(self, images, mask, targets):
            assert [tuple(t.shape) for t in (images, mask, targets["labels"])] == self.shapes
            replayed.append(self.shapes)
            return self.fn(images, mask, targets)

    import detr_fast.graphs

    monkeypatch.setattr(detr_fast.graphs, "GraphedStep", Recorder)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    seen.clear()
    T = max(b[2]["labels"].shape[1] for b in batches)
    m = bench_step.time_mixed(step, batches, "cpu", graph=True, buckets=buckets, max_targets=T, reps=2)
    padded = [bench_step.pad_inputs(b, buckets, T) for b in batches]
    keys = {tuple(p[0].shape) for p in padded}
    assert m["graphs"] == len(captured) == len(keys) < len(batches)
    assert len(replayed) == 2 * len(batches) + len(batches) - len(keys)  # the warm-up pass replays seen shapes
    for (images, mask, targets), (pi, pm, pt) in zip(batches, padded):
        H, W = images.shape[-2:]
        assert pi.shape[-2] in buckets and pi.shape[-1] in buckets and pt["labels"].shape[1] == T
        assert torch.equal(pi[..., :H, :W], images) and not pi[..., H:, :].any() and not pi[..., :, W:].any()
        assert torch.equal(pm[:, :H, :W], mask) and pm[:, H:, :].all() and pm[:, :, W:].all()
        n = targets["labels"].shape[1]
        assert torch.equal(pt["boxes"][:, :n], targets["boxes"]) and not pt["boxes"][:, n:].any()
    own = sum(b[0].shape[-2] * b[0].shape[-1] for b in batches)
    assert m["pad"] == pytest.approx(sum(p[0].shape[-2] * p[0].shape[-1] for p in padded) / own) and m["pad"] > 1


class _NoHostData(torch.overrides.TorchFunctionMode):
    """Fails on tensors made from host data (Python numbers or lists): on a GPU each is a host-to-device copy, a sync
    in the step and an error under CUDA graph capture."""

    BANNED = {torch.tensor, torch.as_tensor, torch.asarray}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.BANNED:
            raise AssertionError(f"tensor made from host data in the step: {func.__name__}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", ["fast_fp32", "fast_fused"])
def test_bench_step_makes_no_tensor_from_host_data_after_the_first_step(variant):
    """bench_step's training step (the one its graph variants capture) builds the loss weights once, on the first
    call; later calls copy nothing from the host."""
    from bench_step import make_step

    torch.manual_seed(0)
    cfg, model, criterion = build(OVER, variant, "cpu")
    step = make_step(model, criterion, cfg, "none", "cpu")
    images, mask, targets = make_batch(2, 64, 96, 7, "cpu", seed=8, max_targets=4)
    with pytest.raises(AssertionError, match="host data"), _NoHostData():  # the detector sees the first call's copy
        step(images, mask, targets)
    first = step(images, mask, targets)
    with _NoHostData():
        second = step(images, mask, targets)
    assert torch.isfinite(first) and torch.isfinite(second)


def test_untimed_options_together_compute_the_same_step():
    """bench_step's fast_next_graph: the fast config's model plus the four options not yet timed on a GPU together
    (bias_grad_mm, nhwc_pool, stem_pad_channels=8, residual_grad_fusion), in float64 on the CPU: the same losses and
    gradients as without them, to float64 rounding (bias_grad_mm and the padded stem change summation orders)."""
    fused = ("model.fused_norm=true", "model.fused_bias_act=true", "model.flat_cast=true", "model.packed_proj=true",
             "model.fused_ffn=true")
    new = ("model.bias_grad_mm=true", "model.nhwc_pool=true", "model.stem_pad_channels=8",
           "model.residual_grad_fusion=true")
    batch = make_batch(2, 64, 96, 7, "cpu", seed=13, max_targets=4)
    results = []
    for extra in (fused, fused + new):
        torch.manual_seed(0)
        _, model, criterion = build(OVER + list(extra), "fast_fp32", "cpu")
        model.double()
        images, mask, targets = batch
        losses = criterion(model(images.double(), mask), targets)
        total = sum(losses[k] * criterion.weight_dict[k] for k in losses)
        total.backward()
        results.append((total.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=0)
    assert g0.keys() == g1.keys() and any("layer3" in n for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-9, atol=1e-12 * float(g0[n].abs().max()), msg=n)


def test_channels_last_images_are_cast_in_the_same_pass():
    """With model.channels_last under autocast, the images change layout and take the trunk's operand dtype in one
    copy, where a layout copy followed by the first convolution's own cast took two: the same outputs bit for bit,
    one operator fewer."""
    from helpers import OpCounter

    torch.manual_seed(0)
    _, model, _ = build(OVER + ["model.fused_bias_act=true"], "fast_fp32", "cpu")
    images, mask, _ = make_batch(2, 64, 96, 7, "cpu", seed=14, max_targets=4)
    runs = []
    for one_pass in (True, False, True):  # the first run fills the folded weights' caches
        model.channels_last = one_pass
        counter = OpCounter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), counter:
            # the two-pass form: the layout copy of the images, then the cast the first convolution makes
            out = model(images if one_pass else images.contiguous(memory_format=torch.channels_last), mask)
        runs.append((out, counter.ops))
    (_, _), (old, old_ops), (new, new_ops) = runs
    assert torch.equal(new["pred_boxes"], old["pred_boxes"]) and torch.equal(new["pred_logits"], old["pred_logits"])
    assert new_ops["aten.clone"] == old_ops["aten.clone"] - 1  # no layout copy of its own
    assert new_ops["aten._to_copy"] == old_ops["aten._to_copy"]  # the cast, now with the layout change
    assert sum(new_ops.values()) == sum(old_ops.values()) - 1
