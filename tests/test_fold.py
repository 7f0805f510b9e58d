"""Folding FrozenBatchNorm2d into convolutions changes outputs and gradients only by rounding."""
import torch

from detr_fast.config import load_config
from detr_fast.models import build_detr
from detr_fast.models.fold import fold_frozen_bn


def _randomize_bn(model, g):
    for name, buf in model.named_buffers():
        if name.endswith("running_var"):
            buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
        elif name.endswith(("running_mean", "bn1.bias", "bn2.bias", "bn3.bias")):
            buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
        elif name.endswith("weight") and "bn" in name or name.endswith("downsample.1.weight"):
            buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)


def test_fold_is_exact_for_resnet18_detr():
    cfg = load_config(None, ["model.backbone=resnet18", "model.hidden_dim=32", "model.nheads=4", "model.enc_layers=1",
                             "model.dec_layers=2", "model.dim_feedforward=64", "model.num_queries=5",
                             "model.num_classes=3", "model.dropout=0.0", "model.fold_bn=false"])
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    ref = build_detr(cfg).double()
    _randomize_bn(ref, g)
    fused = build_detr(cfg).double()
    fused.load_state_dict(ref.state_dict())
    n = fold_frozen_bn(fused)
    assert n == 1 + 8 * 2 + 3  # stem + 8 basic blocks x 2 + 3 downsamples
    assert fused.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 3, 64, 80, generator=g, dtype=torch.float64)
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, 40:] = True
    a, b = ref(x, mask), fused(x, mask)
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=1e-10, atol=1e-12)
    a["pred_logits"].sum().backward()
    b["pred_logits"].sum().backward()
    wa = ref.backbone[0].body.layer3[0].conv1.weight.grad
    wb = fused.backbone[0].body.layer3[0].conv1.weight.grad
    torch.testing.assert_close(wa, wb, rtol=1e-9, atol=1e-12)
    # folded model still loads a plain checkpoint strictly
    fused.load_state_dict(ref.state_dict(), strict=True)


def test_build_detr_folds_when_asked():
    from detr_fast.models.fold import FoldedConv2d
    base = ["model.backbone=resnet18", "model.hidden_dim=32", "model.nheads=4", "model.enc_layers=1",
            "model.dec_layers=1", "model.dim_feedforward=64", "model.num_queries=5", "model.num_classes=3"]
    on = build_detr(load_config(None, base))
    off = build_detr(load_config(None, base + ["model.fold_bn=false"]))
    assert sum(isinstance(m, FoldedConv2d) for m in on.modules()) == 20
    assert not any(isinstance(m, FoldedConv2d) for m in off.modules())
    on.load_state_dict(off.state_dict(), strict=True)
