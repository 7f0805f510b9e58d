"""model.stem_pad_channels: the folded stem convolution runs on its input and weight zero-padded to more input
channels; the model computes the same function up to the convolution's summation order."""
import sys
from pathlib import Path

import pytest
import torch

from detr_fast.config import ConfigError, load_config
from detr_fast.models import fold

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_step import build, make_batch  # noqa: E402

OVER = ["model.num_classes=7", "model.backbone=resnet18", "model.hidden_dim=64", "model.nheads=2",
        "model.enc_layers=2", "model.dec_layers=2", "model.dim_feedforward=128", "model.num_queries=12",
        "model.dropout=0.0"]


def _run(extra, batch, dtype=torch.float64, seen=None):
    torch.manual_seed(0)
    cfg, model, criterion = build(OVER + list(extra), "fast_fp32", "cpu")
    model.to(dtype)
    if seen is not None:
        real = fold.FoldedConv2d._padded

        def spy(self, x, w):
            out = real(self, x, w)
            seen.append((x.shape[1], out[0].shape[1], out[1].shape[1]))
            return out
        fold.FoldedConv2d._padded = spy
    try:
        out = model(batch[0].to(dtype), batch[1])
    finally:
        if seen is not None:
            fold.FoldedConv2d._padded = real
    losses = criterion(out, batch[2])
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses)
    total.backward()
    return out["pred_boxes"], total.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("extra", [(), ("model.fused_bias_act=true",)], ids=["plain", "fused_bias_act"])
def test_padded_stem_equals_the_plain_one(extra):
    batch = make_batch(2, 64, 96, 7, "cpu", seed=6, max_targets=4)
    b0, l0, g0 = _run(extra, batch)
    seen = []
    b1, l1, g1 = _run(list(extra) + ["model.stem_pad_channels=8"], batch, seen=seen)
    assert (3, 8, 8) in seen  # the stem ran on 8 channels
    assert all(c_in == c_x for c_in, c_x, _ in seen if c_in != 3)  # every other convolution as it was
    torch.testing.assert_close(b1, b0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=0)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-9, atol=1e-12, msg=n)


def test_padded_stem_in_a_simulated_capture(monkeypatch):
    """Under a capture TrunkFold lends the stem its folded weight (flat_cast): padded there too, the same result."""
    batch = make_batch(2, 64, 96, 7, "cpu", seed=7, max_targets=4)
    extra = ["model.fused_bias_act=true", "model.flat_cast=true"]
    b0, l0, _ = _run(extra, batch)
    monkeypatch.setattr(fold, "_capturing", lambda x: True)
    seen = []
    b1, l1, _ = _run(extra + ["model.stem_pad_channels=8"], batch, seen=seen)
    assert (3, 8, 8) in seen
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=0)


def test_padding_stands_aside_where_gradients_flow():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    folded = fold.FoldedConv2d(conv, fold.FrozenBatchNorm2d(4))
    folded.pad_in = 8
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    xp, wp = folded._padded(x, conv.weight.detach())
    assert xp is x  # x needs a gradient: unpadded
    with torch.no_grad():
        xp, wp = folded._padded(x, conv.weight)
    assert xp.shape[1] == wp.shape[1] == 8 and not xp[:, 3:].any() and not wp[:, 3:].any()


def test_config_checks():
    with pytest.raises(ConfigError, match="stem_pad_channels"):
        load_config(None, ["model.stem_pad_channels=8", "model.fold_bn=false"])
    with pytest.raises(ConfigError, match=">= 0"):
        load_config(None, ["model.stem_pad_channels=-1"])


@pytest.mark.needs_cuda
def test_padded_stem_on_gpu_by_the_low_precision_rule():
    """The stem convolution in bf16 channels_last on a GPU (cuDNN's fused conv + bias + ReLU and the plain one): the
    padded run's error against float64 is at most twice the unpadded run's."""
    gen = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    bn = fold.FrozenBatchNorm2d(64)
    bn.weight.copy_(torch.rand(64, generator=gen) + 0.5)
    bn.bias.copy_(torch.randn(64, generator=gen))
    folded = fold.FoldedConv2d(conv, bn).cuda()
    bn.cuda()  # not a submodule of folded (its buffers keep their own names): moved on its own
    x = torch.randn(2, 3, 97, 131, generator=gen).cuda().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        exact = torch.nn.functional.conv2d(x.double(), (conv.weight * (bn.weight * (bn.running_var + bn.eps).rsqrt())
                                                        .view(-1, 1, 1, 1)).double(), None, 2, 3)
        for fused in (False, True):
            folded.fused_relu = folded.cudnn_fusion = fused
            outs = []
            for pad in (0, 8):
                folded.pad_in = pad
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    outs.append(folded.conv_nobias(x)[0] if not fused else folded.conv_bias_relu(x))
            ref = exact if not fused else torch.relu(exact + folded._scale_shift_now()[1].double().view(1, -1, 1, 1))
            err0, err1 = ((o.double() - ref).abs().max() for o in outs)
            assert err1 <= 2 * err0 + 1e-6, (fused, err0, err1)
