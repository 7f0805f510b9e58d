"""Shared test helpers: device parametrization whose CUDA case is skipped without a GPU; a Python Philox4x32-10; an
operator counter; the check of add_dropout_layernorm's saved statistics; a tiny DETR config."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


def cpu_and_cuda():
    return ("cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda))


def philox4x32_10(ctr, key):
    """Philox4x32-10 in Python (Salmon et al. 2011), independent of csrc/common/philox.h."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    M = 0xFFFFFFFF
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M, (k1 + 0xBB67AE85) & M
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M, p1 & M, ((p0 >> 32) ^ c3 ^ k1) & M, p0 & M
    return c0, c1, c2, c3


class OpCounter(TorchDispatchMode):
    """Counts the operators dispatched inside the block: ops[name] (e.g. "aten._to_copy")."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def assert_layernorm_stats(x, residual, mean, rstd, eps=1e-5):
    """add_dropout_layernorm's saved statistics without dropout: mean and rstd of residual + x per row, in the
    accumulation dtype (float64 for float64 inputs, float32 otherwise)."""
    d = x.shape[-1]
    rows = x.numel() // d if d else 0
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert mean.shape == rstd.shape == (rows,) and mean.dtype == rstd.dtype == acc
    if rows:
        h = (x.double() + residual.double()).reshape(rows, d).cpu()
        torch.testing.assert_close(mean.double().cpu(), h.mean(-1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rstd.double().cpu(), (h.var(-1, unbiased=False) + eps).rsqrt(), rtol=1e-5, atol=0)


def small_cfg(**over):
    """A tiny DETR (light backbone, hidden 32, 2 encoder and 3 decoder layers, 7 queries, 5 classes, no dropout);
    `over` maps dotted config keys to values, applied last."""
    from detr_fast.config import load_config

    sets = ["model.backbone=light", "model.light_channels=[8,16,16,32]", "model.hidden_dim=32", "model.nheads=4",
            "model.enc_layers=2", "model.dec_layers=3", "model.dim_feedforward=64", "model.num_queries=7",
            "model.num_classes=5", "model.dropout=0.0"]
    return load_config(None, sets + [f"{k}={v}" for k, v in over.items()])


def registry_results(op: str, device: str, seed: int) -> list:
    """Runs every registered validation case of `op` for `device` (the benchmark shapes aside), each dtype with fresh
    inputs drawn from seed + the case's index; returns the registry's Result of each (case, dtype)."""
    from detr_fast.ops.registry import cases, run_case

    found = [c for c in cases(op=op, device=device) if "bench" not in c.tags]
    return [run_case(case, device, dtype, seed=seed + i) for i, case in enumerate(found) for dtype in case.dtypes]


def randomize_frozen_bn(module, seed: int) -> None:
    """Frozen statistics away from the identity in every FrozenBatchNorm2d of module (folded ones included): weights
    in [0.5, 1.5), small biases and means, variances in [0.5, 1.5)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            c = m.weight.shape[0]
            m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
