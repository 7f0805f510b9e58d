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
