"""The whole training step as one CUDA graph (detr_fast.graphs.GraphedStep): replays compute what eager steps compute;
inputs of another shape are refused. CUDA cases run only on a GPU."""
import sys
from pathlib import Path

import pytest
import torch

from detr_fast.graphs import GraphedStep

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_step import build, make_batch, make_step  # noqa: E402

OVER = ["model.num_classes=7", "model.backbone=resnet18", "model.hidden_dim=64", "model.nheads=2",
        "model.enc_layers=2", "model.dec_layers=3", "model.dim_feedforward=128", "model.num_queries=12",
        "model.dropout=0.0"]


def test_graphed_step_needs_cuda_inputs():
    with pytest.raises(ValueError, match="CUDA tensors"):
        GraphedStep(lambda x: x * 2, (torch.ones(3),))


FUSED = ("model.flat_cast=true", "model.packed_proj=true", "model.fused_norm=true", "model.fused_bias_act=true",
         "model.fused_ffn=true")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("amp,extra", [("none", ()), ("bf16", ()), ("bf16", FUSED),
                                       ("bf16", FUSED + ("model.conv_fusion=true",)),
                                       ("bf16", FUSED + ("model.bias_grad_mm=true",)),
                                       ("bf16", FUSED + ("model.conv_fusion=true", "model.residual_grad_fusion=true",
                                                         "model.nhwc_pool=true", "model.stem_pad_channels=8"))],
                         ids=["none", "bf16", "bf16_fused", "bf16_fused_cudnn", "bf16_fused_bias_grad_mm",
                              "bf16_fused_cudnn_rgrad_pool_stem8"])
def test_graphed_step_equals_eager_steps(amp, extra):
    """Same initial weights, the same 3 warm-up steps, then 3 more steps eagerly and as graph replays on new batches
    of the captured shape: the same losses and the same weights at the end (with every fusion too: the captured
    step folds the trunk through TrunkFold, the eager one through the per-convolution caches)."""
    from detr_fast.ops import has_kernel

    if not (has_kernel("linear_assignment", "cuda") and has_kernel("matching_cost", "cuda")):
        pytest.skip("the CUDA matcher kernels are not built: the reference matcher syncs by design")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    _, base, _ = build(OVER + list(extra), "fast_fp32", "cuda")
    state = {k: v.clone() for k, v in base.state_dict().items()}
    first = make_batch(2, 96, 128, 7, "cuda", seed=1, min_targets=5, max_targets=5)
    later = [make_batch(2, 96, 128, 7, "cuda", seed=s, min_targets=5, max_targets=5) for s in (2, 3, 4)]
    results = []
    for graphed in (False, True):
        cfg, model, criterion = build(OVER + list(extra), "fast_fp32", "cuda")
        model.load_state_dict(state)
        step = make_step(model, criterion, cfg, amp, "cuda", fused_opt=True, capturable=True)
        if graphed:
            run = GraphedStep(step, first, warmup=3)
        else:
            for _ in range(3):
                step(*first)
            run = step
        losses = [float(run(*b)) for b in later]
        results.append((losses, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    (eager_losses, eager_w), (graph_losses, graph_w) = results
    assert graph_losses == pytest.approx(eager_losses, rel=1e-4)
    for k in eager_w:
        torch.testing.assert_close(graph_w[k], eager_w[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.needs_cuda
def test_graphed_step_refuses_another_shape():
    a = torch.ones(4, device="cuda")
    g = GraphedStep(lambda x: x * 2, (a,), warmup=1)
    assert torch.equal(g(torch.full((4,), 3.0, device="cuda")), torch.full((4,), 6.0, device="cuda"))
    with pytest.raises(ValueError, match="captured for"):
        g(torch.ones(5, device="cuda"))
    with pytest.raises(ValueError, match="structure"):
        g(a, a)


@pytest.mark.needs_cuda
def test_dropout_inside_a_graph_draws_fresh_masks_per_replay():
    """Our attention and LayerNorm kernels take (seed, offset) from the CUDA generator in a capture-safe way: every
    replay gets a new offset (rng_state changes) and so a new dropout mask."""
    from detr_fast.ops.attention import attention_with_state
    from detr_fast.ops.layernorm import add_dropout_layernorm_with_state

    q, k = torch.randn(2, 4, 16, 32, device="cuda"), torch.randn(2, 4, 20, 32, device="cuda")
    v = torch.randn_like(k)
    x = torch.randn(64, 256, device="cuda")
    r, w, b = torch.randn_like(x), torch.ones(256, device="cuda"), torch.zeros(256, device="cuda")

    def step(q, x):
        o, _, s1 = attention_with_state(q, k, v, None, 0.1)
        y, _, _, s2 = add_dropout_layernorm_with_state(x, r, w, b, 0.1)
        return o, y, s1, s2

    graphed = GraphedStep(step, (q, x), warmup=1)
    seen = []
    for _ in range(3):
        o, y, s1, s2 = (t.clone() for t in graphed(q, x))
        seen.append((o, y, tuple(s1.tolist()), tuple(s2.tolist())))
    for a, b_ in zip(seen, seen[1:]):
        assert a[2] != b_[2] and a[3] != b_[3]
        assert not torch.equal(a[0], b_[0]) and not torch.equal(a[1], b_[1])


@pytest.mark.needs_cuda
def test_tensors_the_step_closes_over_outlive_the_capture():
    """A tensor only the step's closure holds (the engine's loss weights) is read by every replay at its captured
    address: GraphedStep keeps the step, so the tensor stays alive and replays stay right."""
    import gc
    import weakref

    def make():
        weights = torch.tensor([1.0, 2.0], device="cuda")
        return GraphedStep(lambda a: (a * weights).sum(), (torch.ones(2, device="cuda"),), warmup=1), \
            weakref.ref(weights)

    graphed, ref = make()
    gc.collect()
    assert ref() is not None
    torch.cuda.empty_cache()
    _ = torch.full((1 << 20,), 7.0, device="cuda")  # reuse freed memory if there were any
    assert graphed(torch.tensor([3.0, 4.0], device="cuda")).item() == pytest.approx(11.0)
