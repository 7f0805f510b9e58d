"""Benchmark charts: the step-breakdown categories and the PNGs drawn from real benchmark rows (no timing checks)."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_step import categorize, step_breakdown  # noqa: E402
from plot_results import main as plot_main  # noqa: E402


@pytest.mark.parametrize("name,cat", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_s1688gemm_64x64>", "matmul"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("void cudnn::bn_fw_tr_1C11_kernel_NCHW<float>", "normalization"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float>", "normalization"),
    ("void detr_fast::attention_fwd_kernel<__nv_bfloat16, 32>", "attention"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>", "attention"),
    ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("detr_fast::linear_assignment", "matching+loss"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "elementwise+other"),
    ("aten::mm", "matmul"),
    ("aten::mkldnn_convolution", "convolution"),
])
def test_categories(name, cat):
    assert categorize(name) == cat


def test_cpu_breakdown_and_charts(tmp_path):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64)
    conv = torch.nn.Conv2d(3, 8, 3)
    x, img = torch.randn(32, 64), torch.randn(2, 3, 16, 16)

    def step():
        (lin(x).relu().sum() + torch.nn.functional.layer_norm(conv(img), [14]).sum()).backward()

    b = step_breakdown(step, "cpu", iters=2)
    assert b["step"] > 0 and b["matmul"] > 0 and b["convolution"] > 0 and b["normalization"] > 0
    parts = sum(v for k, v in b.items() if k != "step")
    assert parts >= b["step"] * 0.999  # the categories plus the unattributed rest cover the step
    step_doc = {"environment": {"device": "cpu"}, "batch": [2, 16, 16],
                "rows": [{"variant": "a", "ms_per_step": b["step"], "breakdown_ms": b},
                         {"variant": "b", "ms_per_step": b["step"] / 2, "breakdown_ms": b}]}
    ops_doc = {"environment": {"device": "cpu"},
               "rows": [{"op": "box_loss", "case": "N=7", "dtype": "float32", "pass": "fwd", "reference_ms": 2.0,
                         "compiled_ref_ms": 1.0, "ours_ms": 0.5},
                        {"op": "box_loss", "case": "N=7", "dtype": "float32", "pass": "fwd+bwd",
                         "reference_ms": 3.0, "compiled_ref_ms": None, "ours_ms": 1.5}]}
    (tmp_path / "step.json").write_text(json.dumps(step_doc))
    (tmp_path / "ops.json").write_text(json.dumps(ops_doc))
    assert plot_main(["--ops", str(tmp_path / "ops.json"), "--step", str(tmp_path / "step.json"),
                      "--out", str(tmp_path / "charts")]) == 0
    for name in ("kernel_speedups.png", "step_breakdown.png"):
        data = (tmp_path / "charts" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
