"""benchmarks/count_step.py: the FLOP and traffic counts run on meta tensors and add up."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import count_step  # noqa: E402

from detr_fast.config import load_config  # noqa: E402


def test_flops_split_into_parts():
    cfg = load_config(None, ["model.backbone=resnet18", "model.fold_bn=false", "model.enc_layers=1",
                             "model.dec_layers=2"])
    f = count_step.step_flops(cfg, 2, 64, 96)
    parts = sum(v for k, v in f.items() if k != "total")
    assert f["backbone"] > 0 and f["transformer"] > 0
    # FlopCounterMode attributes a backward op to the module(s) active when autograd runs it, which can credit a few
    # of the decoder's products to two modules: the parts add up to the total within a percent, not exactly
    assert abs(parts - f["total"]) <= 0.01 * f["total"]


def test_fused_traffic_resnet50():
    t = count_step.bias_relu_traffic(2, 64, 96, "resnet50")
    # 16 bottlenecks: 2 inner convs each (2 launches -> 1), the block end (3 or 4 with a downsample -> 1); the stem
    assert t["eager_launches"] - t["fused_launches"] == 16 * 2 + 16 * 2 + 4 + 1
    assert 0 < t["fused_bytes"] < t["eager_bytes"]


def test_main_prints(capsys):
    assert count_step.main(["--batch", "1", "--height", "64", "--width", "64", "--backbone", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "TFLOP" in out and "GB less" in out


def test_folded_and_fused_trunk_count_the_same_flops():
    """Folding and fusing change passes over memory, not the convolutions: the same FLOPs (meta tensors; the folded
    model's autocast check and the fused blocks run on the meta device too)."""
    base = ["model.backbone=resnet18", "model.enc_layers=1", "model.dec_layers=1"]
    plain = count_step.step_flops(load_config(None, base + ["model.fold_bn=false"]), 1, 64, 64)
    fused = count_step.step_flops(load_config(None, base + ["model.fold_bn=true", "model.fused_bias_act=true"]), 1,
                                  64, 64)
    assert fused["backbone"] == plain["backbone"] > 0


def test_roofline_of_the_step():
    """--roofline: the whole training step on fake tensors. The fast variants compute the reference's matrix
    products (same FLOPs by kind, attention credited by hand), move fewer bytes in fewer operators, and the fusions
    fewer still; the kinds add up to the total; the floor is at least the minimum kernel time per operator."""
    import pytest

    size = (2, 64, 96, "resnet18")
    rows = {v: count_step.step_roofline(v, *size) for v in ("ref_tf32", "fast", "fast_fused")}
    rates = {"bfloat16": 800.0, "float16": 800.0, "float32": 400.0, "other": 50.0}
    tables = {v: count_step.roofline_table(r, 3.0, rates, 2.0) for v, r in rows.items()}
    ref, fast, fused = tables["ref_tf32"], tables["fast"], tables["fast_fused"]
    for t in tables.values():
        for key in ("ops", "GB", "TFLOP", "floor_ms"):
            assert sum(d[key] for k, d in t.items() if k != "total") == pytest.approx(t["total"][key])
        assert t["total"]["floor_ms"] >= t["total"]["ops"] * 2e-3
    for kind in ("convolution", "attention"):
        assert fast[kind]["TFLOP"] > 0
        assert fused[kind]["TFLOP"] == pytest.approx(fast[kind]["TFLOP"])
    # the reference's attention products (bmm) against ours (the backward recomputes the scores: 2 more per 12)
    assert fast["attention"]["TFLOP"] == pytest.approx(ref["attention"]["TFLOP"] * 14 / 12, rel=0.02)
    assert fast["convolution"]["TFLOP"] == pytest.approx(ref["convolution"]["TFLOP"])
    # (at this size weights outweigh activations, and the fusions' extra weight copies (flat_cast) outweigh the
    # activation passes they save; at DETR's size they save 6 GB: RESULTS.md)
    assert ref["total"]["GB"] > fast["total"]["GB"] > 0 and fused["total"]["GB"] > 0
    assert ref["total"]["ops"] > fast["total"]["ops"] > fused["total"]["ops"]
    # bytes: a fused AdamW reads and writes parameters and both moments and reads the gradients (fp32); its schema
    # also marks the gradients written (counted so: 8 passes), plus the step counters' few bytes
    n = sum(p.numel() for p in _trainable(size))
    adam = sum(b for name, b, _, _ in rows["fast"] if name == "aten._fused_adamw_")
    assert 8 * 4 * n <= adam <= 8 * 4 * n + 8 * 4 * 1000


def _trainable(size):
    import bench_step

    _, model, _ = bench_step.build(["model.num_classes=91", f"model.backbone={size[3]}", "model.dropout=0.1"], "fast",
                                   "cpu")
    return [p for p in model.parameters() if p.requires_grad]


def test_attention_flops_by_hand():
    import torch

    q, k = torch.empty(2, 8, 100, 32, device="meta"), torch.empty(2, 8, 850, 32, device="meta")
    fwd = count_step._attention_flops("detr_fast.attention", (q, k, k))
    assert fwd == 4 * 2 * 8 * 100 * 850 * 32
    assert count_step._attention_flops("detr_fast.attention_backward", (q, q, k, k)) == 2.5 * fwd
    assert count_step._attention_flops("aten.mm", (q, k)) == 0
