"""max_pool2d_nhwc: torch's max_pool2d of a channels_last input, bit for bit (NaN and -inf included); MaxPoolNHWC takes
it only where it applies; the model option changes nothing but the kernel. The CUDA kernel runs here through the
host emulator (test_cuda_emulated.py) and on a GPU in the needs_cuda cases."""
import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_and_cuda, registry_results

from detr_fast.ops import has_kernel, max_pool2d_nhwc
from detr_fast.ops.cases_pool import make_input, mismatches
from detr_fast.ops.pool import MaxPoolNHWC

pytestmark = pytest.mark.skipif(not has_kernel("max_pool2d_nhwc", "cpu"), reason="detr_fast._C is not built")


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,kernel,stride,padding", [((2, 64, 37, 51), 3, 2, 1), ((3, 5, 17, 9), 3, 2, 1),
                                                         ((1, 16, 10, 7), (3, 2), (1, 2), (1, 0)),
                                                         ((2, 8, 4, 4), 2, 2, 0), ((1, 3, 1, 1), 3, 2, 1),
                                                         ((0, 8, 5, 5), 3, 2, 1), ((2, 8, 6, 6), 1, 1, 0)])
def test_equals_torch_bit_for_bit(device, dtype, shape, kernel, stride, padding):
    gen = torch.Generator().manual_seed(sum(shape))
    x = make_input(shape, device, dtype, gen)
    out = max_pool2d_nhwc(x, kernel, stride, padding)
    assert out.dtype == dtype and out.device == x.device
    assert mismatches(out, x, kernel, stride, padding) == 0


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_bad_inputs(device):
    op = torch.ops.detr_fast.max_pool2d_nhwc
    x = torch.randn(2, 8, 6, 6, device=device).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="channels_last"):
        op(x.contiguous(), [3, 3], [2, 2], [1, 1])
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        op(x[0], [3, 3], [2, 2], [1, 1])
    with pytest.raises(ValueError, match="padding must lie"):
        op(x, [3, 3], [2, 2], [2, 2])
    with pytest.raises(ValueError, match="positive"):
        op(x, [3, 0], [2, 2], [1, 0])
    with pytest.raises(ValueError, match="smaller than the kernel"):
        op(x, [9, 9], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="float32"):
        op(x.to(torch.int32), [3, 3], [2, 2], [1, 1])


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_registry_cases(device):
    results = registry_results("max_pool2d_nhwc", device, seed=700)
    assert len({r.case for r in results}) == 4
    assert all(r.passed for r in results), [r for r in results if not r.passed]


def test_module_takes_the_kernel_only_where_it_applies(monkeypatch):
    calls = []
    real = torch.ops.detr_fast.max_pool2d_nhwc

    class Spy:
        def __call__(self, *a):
            calls.append(1)
            return real(*a)

    import detr_fast.ops.pool as pool

    monkeypatch.setattr(pool.torch.ops.detr_fast, "max_pool2d_nhwc", Spy(), raising=False)
    m = MaxPoolNHWC(torch.nn.MaxPool2d(3, 2, 1))
    x = torch.randn(2, 8, 9, 11).contiguous(memory_format=torch.channels_last)
    ref = F.max_pool2d(x, 3, 2, 1)
    assert torch.equal(m(x), ref) and len(calls) == 1
    assert torch.equal(m(x.contiguous()), ref) and len(calls) == 1  # NCHW: torch's pool
    xg = x.clone().requires_grad_()
    out = m(xg)  # a gradient is needed: torch's pool, which has a backward
    out.sum().backward()
    assert len(calls) == 1 and xg.grad is not None
    with pytest.raises(ValueError, match="dilation 1"):
        MaxPoolNHWC(torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True))


def test_model_with_nhwc_pool_equals_without():
    """The whole fast model (channels_last trunk, folded, fused) with model.nhwc_pool: outputs, loss and gradients
    equal bit for bit, and the stem's pool ran through the op."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_step import build, make_batch

    over = ["model.num_classes=7", "model.backbone=resnet18", "model.hidden_dim=64", "model.nheads=2",
            "model.enc_layers=2", "model.dec_layers=2", "model.dim_feedforward=128", "model.num_queries=12",
            "model.dropout=0.0", "model.fused_bias_act=true"]
    batch = make_batch(2, 64, 96, 7, "cpu", seed=4, max_targets=4)
    results = []
    for on in (False, True):
        torch.manual_seed(0)
        cfg, model, criterion = build(over + [f"model.nhwc_pool={str(on).lower()}"], "fast_fp32", "cpu")
        assert isinstance(model.backbone[0].body.maxpool, MaxPoolNHWC) == on
        out = model(*batch[:2])
        losses = criterion(out, batch[2])
        total = sum(losses[k] * criterion.weight_dict[k] for k in losses)
        total.backward()
        results.append((out["pred_boxes"], total, {n: p.grad for n, p in model.named_parameters()
                                                   if p.grad is not None}))
    (b0, l0, g0), (b1, l1, g1) = results
    assert torch.equal(b0, b1) and torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[n], g1[n]) for n in g0)


def test_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 8, 13, 10).contiguous(memory_format=torch.channels_last))
        out = torch.ops.detr_fast.max_pool2d_nhwc(x, [3, 3], [2, 2], [1, 1])
    assert out.shape == (2, 8, 7, 5) and out.is_contiguous(memory_format=torch.channels_last)
