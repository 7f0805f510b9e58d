"""model.packed_proj: q and k of each self-attention from one matrix product, the keys and values of every decoder
cross-attention from two, up front. Same parameters, same function (to rounding), fewer kernels."""
import sys
from pathlib import Path

import pytest
import torch
from helpers import OpCounter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_step import build, make_batch  # noqa: E402

ENC, DEC = 2, 3
OVER = ["model.num_classes=7", "model.backbone=resnet18", "model.hidden_dim=64", "model.nheads=2",
        f"model.enc_layers={ENC}", f"model.dec_layers={DEC}", "model.dim_feedforward=96", "model.num_queries=11"]


def _run(extra, batch, dtype=torch.float32, seed=0, amp=False, count=False, variant="fast_fp32"):
    """fast_fp32: our kernels with the fused attention core (its C++ kernel here), autocast as asked."""
    torch.manual_seed(0)
    cfg, model, criterion = build(OVER + list(extra), variant, "cpu")
    model = model.to(dtype)
    images, mask, targets = batch
    counter = OpCounter()
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        if count:
            model(images.to(dtype), mask)  # fills the folded-BatchNorm caches before counting
            torch.manual_seed(seed)
        with counter if count else torch.enable_grad():
            out = model(images.to(dtype), mask)
            losses = criterion(out, targets)
            total = sum(losses[k] * criterion.weight_dict[k] for k in losses)
            total.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return model, out, total.detach(), grads, counter.ops


def _close(a, b, rel):
    """Every tensor within rel of its own largest magnitude."""
    err = (a.double() - b.double()).abs().max().item()
    assert err <= rel * max(b.abs().max().item(), 1e-30), (err, b.abs().max().item())


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-12), (torch.float32, 2e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_packed_proj_equals_plain(dtype, rel, dropout):
    """Fused attention core (C++ kernel), same weights, batch and dropout draws: outputs, loss and every gradient
    agree to rounding; the state dict is unchanged."""
    seed = int(torch.randint(0, 10_000, ()))
    batch = make_batch(2, 80, 112, 7, "cpu", seed=seed, max_targets=6)
    extra = (f"model.dropout={dropout}",)
    m1, o1, l1, g1, _ = _run(extra, batch, dtype, seed)
    m2, o2, l2, g2, _ = _run(extra + ("model.packed_proj=true",), batch, dtype, seed)
    assert list(m1.state_dict()) == list(m2.state_dict())
    _close(l2, l1, rel)
    for key in ("all_logits", "all_boxes"):
        _close(o2[key], o1[key], rel)
    assert g1.keys() == g2.keys() and any("multihead_attn.in_proj" in n for n in g1)
    for n in g1:
        _close(g2[n], g1[n], rel)


def test_packed_proj_with_the_other_fusions_in_bf16():
    """The fast step's combination (bf16 autocast, fused norm, one-pass weight cast): packed and plain agree to bf16
    rounding of the same computation."""
    batch = make_batch(2, 80, 112, 7, "cpu", seed=11, max_targets=6)
    extra = ("model.dropout=0.0", "model.fused_norm=true", "model.flat_cast=true")
    _, o1, l1, g1, _ = _run(extra, batch, amp=True)
    _, o2, l2, g2, _ = _run(extra + ("model.packed_proj=true",), batch, amp=True)
    assert o2["pred_boxes"].dtype == o1["pred_boxes"].dtype
    _close(l2, l1, 2e-2)
    _close(o2["all_boxes"].float(), o1["all_boxes"].float(), 3e-2)
    for n in g1:
        assert torch.isfinite(g2[n]).all(), n


def test_packed_proj_launches_fewer_matrix_products():
    """Forward: one GEMM fewer per self-attention and 2 instead of 2 * DEC for the cross-attention keys and values;
    backward: two fewer per GEMM removed (input and weight gradients)."""
    batch = make_batch(2, 64, 96, 7, "cpu", seed=2, max_targets=4)
    extra = ("model.dropout=0.0",)
    _, _, _, _, plain = _run(extra, batch, count=True)
    _, _, _, _, packed = _run(extra + ("model.packed_proj=true",), batch, count=True)

    def gemms(c):
        return c["aten.mm"] + c["aten.addmm"] + c["aten.bmm"] + c["aten.matmul"]
    removed = (ENC + DEC) + (2 * DEC - 2)
    assert gemms(packed) == gemms(plain) - 3 * removed, (gemms(plain), gemms(packed))
    assert packed["aten.add"] < plain["aten.add"]
    assert sum(packed.values()) < sum(plain.values())


def test_packed_proj_is_a_no_op_with_the_reference_core():
    batch = make_batch(2, 64, 96, 7, "cpu", seed=4, max_targets=4)
    extra = ("model.dropout=0.0",)  # ref_fp32: nn.MultiheadAttention's math
    _, o1, l1, g1, c1 = _run(extra, batch, count=True, variant="ref_fp32")
    _, o2, l2, g2, c2 = _run(extra + ("model.packed_proj=true",), batch, count=True, variant="ref_fp32")
    assert c1 == c2 and torch.equal(l1, l2) and all(torch.equal(g1[n], g2[n]) for n in g1)


@pytest.mark.needs_cuda
def test_packed_proj_on_cuda_bf16():
    """On a GPU (fused CUDA core, bf16 autocast): packed and plain agree to bf16 rounding; fp32 to 1e-4."""
    batch = [t.cuda() if torch.is_tensor(t) else t for t in make_batch(2, 96, 128, 7, "cpu", seed=5, max_targets=6)]
    batch[2] = {k: v.cuda() for k, v in batch[2].items()}

    def run(packed, amp):
        torch.manual_seed(0)
        cfg, model, criterion = build(OVER + ["model.dropout=0.0", f"model.packed_proj={str(packed).lower()}"],
                                      "fast", "cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = model(batch[0], batch[1])
            losses = criterion(out, batch[2])
            total = sum(losses[k] * criterion.weight_dict[k] for k in losses)
        total.backward()
        return total.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    for amp, rel in ((False, 1e-4), (True, 2e-2)):
        (l1, g1), (l2, g2) = run(False, amp), run(True, amp)
        _close(l2, l1, rel)
        assert g1.keys() == g2.keys()
        if not amp:
            for n in g1:
                _close(g2[n], g1[n], 1e-3)
