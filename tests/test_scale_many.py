"""scale_many: many tensors scaled per channel in one launch, each product rounded once to the output dtype; equal bit
for bit to torch.mul(x, s.view(C, 1, ...), out=...) per tensor (reference.scale_many), forward and through
ScaleMany's backward. The CUDA kernel runs here through the host emulator (test_cuda_emulated.py) and on a GPU in the
needs_cuda tests below."""
import pytest
import torch
from helpers import cpu_and_cuda, registry_results

from detr_fast.ops import has_kernel, reference, scale_many
from detr_fast.ops.scale import ScaleMany

pytestmark = pytest.mark.skipif(not has_kernel("scale_many", "cpu"), reason="detr_fast._C is not built")

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def make_tensors(gen, device, dtype, shapes=((7, 3, 3, 3), (64, 5, 1, 1), (9,), (13, 17), (1, 2, 3, 3), (0, 4, 3, 3),
                                             (6, 0, 1, 1)), channels_last=(True, False, False, False, True, False,
                                                                            False)):
    xs = []
    for shape, cl in zip(shapes, channels_last):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        xs.append(x.to(device))
    scale = torch.rand(sum(s[0] for s in shapes), generator=gen, dtype=torch.float64) * 2 + 0.25
    return xs, scale.to(device)


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and g.stride() == w.stride()
        assert torch.equal(g, w)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("in_dtype", FLOATS)
@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("scale_dtype", (torch.float32, torch.float64))
def test_equals_reference_bit_for_bit(device, in_dtype, out_dtype, scale_dtype):
    gen = torch.Generator().manual_seed(hash((str(in_dtype), str(out_dtype), str(scale_dtype))) % 2**31)
    xs, scale = make_tensors(gen, device, in_dtype)
    scale = scale.to(scale_dtype)
    assert_same(scale_many(xs, scale, out_dtype), reference.scale_many(xs, scale, out_dtype))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_many_tensors_and_the_empty_list(device):
    """More tensors than one CUDA launch takes (48), odd channel counts; and no tensors at all."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(int(c), 3, 1, 1) for c in torch.randint(1, 40, (61,), generator=gen)]
    xs, scale = make_tensors(gen, device, torch.float32, shapes, [i % 3 == 0 for i in range(61)])
    assert_same(scale_many(xs, scale, torch.bfloat16), reference.scale_many(xs, scale, torch.bfloat16))
    assert scale_many([], scale[:0], torch.float32) == []


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_bad_inputs(device):
    gen = torch.Generator().manual_seed(8)
    xs, scale = make_tensors(gen, device, torch.float32)
    op = torch.ops.detr_fast.scale_many
    with pytest.raises(ValueError, match="one value per channel"):
        op(xs, scale[:-1], torch.float32)
    with pytest.raises(ValueError, match="1-D"):
        op(xs, scale[None], torch.float32)
    with pytest.raises(ValueError, match="float32 or float64"):
        op(xs, scale.half(), torch.float32)
    with pytest.raises(ValueError, match="one dtype"):
        op([xs[0], xs[1].double()], scale[:71], torch.float32)
    with pytest.raises(ValueError, match="contiguous or channels_last"):
        op([xs[3].t()], scale[:17], torch.float32)
    with pytest.raises(ValueError, match="channel dimension"):
        op([torch.ones((), device=device)], scale[:0], torch.float32)
    with pytest.raises(ValueError, match="dtype must be"):
        op(xs, scale, torch.int32)
    with pytest.raises(ValueError, match="float32, float64"):
        op([x.to(torch.int64) for x in xs], scale, torch.float32)
    if device == "cuda":
        with pytest.raises(ValueError, match="same device"):
            op([x.cpu() for x in xs], scale, torch.float32)


def test_gradcheck():
    gen = torch.Generator().manual_seed(9)
    xs, scale = make_tensors(gen, "cpu", torch.float64, shapes=((3, 2, 3, 3), (5, 4), (2,)),
                             channels_last=(True, False, False))
    xs = [x.requires_grad_() for x in xs]
    assert torch.autograd.gradcheck(lambda *ws: ScaleMany.apply(scale, torch.float64, *ws), tuple(xs))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_scale_many_function_equals_one_product_per_tensor(device):
    """ScaleMany under the trunk's use (fp32 weights, bf16 outputs, bf16 gradients back to fp32): outputs and every
    gradient equal, bit for bit, the per-tensor product autocast computes (multiply in fp32, round once; gradient
    converted exactly, times the scale); an output the loss does not use gets a zero gradient; a gradient in another
    layout is brought to its tensor's."""
    gen = torch.Generator().manual_seed(10)
    xs, scale = make_tensors(gen, device, torch.float32, shapes=((8, 3, 3, 3), (16, 8, 1, 1), (5, 16, 3, 3)),
                             channels_last=(True, True, False))
    scale = scale.float()
    ws1 = [x.clone().requires_grad_() for x in xs]
    ws2 = [x.clone().requires_grad_() for x in xs]
    outs = ScaleMany.apply(scale, torch.bfloat16, *ws1)
    refs, off = [], 0
    for w in ws2:
        c = w.shape[0]
        refs.append((w * scale[off:off + c].view(c, 1, 1, 1)).to(torch.bfloat16))
        off += c
    for o, r in zip(outs, refs):
        assert o.dtype == torch.bfloat16 and o.stride() == r.stride() and torch.equal(o, r.detach())
    gs = [torch.randn(o.shape, generator=gen).to(device, torch.bfloat16) for o in outs]
    gs[1] = gs[1].contiguous()  # another layout than its channels_last tensor
    (outs[0] * gs[0]).float().sum().backward(retain_graph=True)
    (outs[1] * gs[1]).float().sum().backward()
    (refs[0] * gs[0]).float().sum().backward(retain_graph=True)
    (refs[1] * gs[1]).float().sum().backward()
    for a, b in zip(ws1[:2], ws2[:2]):
        assert a.grad.dtype == torch.float32 and torch.equal(a.grad, b.grad)
    assert ws1[2].grad is None or not ws1[2].grad.any()  # output 2 unused


def test_fake_tensors_keep_shapes_and_layouts():
    from torch._subclasses.fake_tensor import FakeTensorMode

    gen = torch.Generator().manual_seed(11)
    xs, scale = make_tensors(gen, "cpu", torch.float32)
    with FakeTensorMode() as mode:
        fx = [mode.from_tensor(x) for x in xs]
        out = torch.ops.detr_fast.scale_many(fx, mode.from_tensor(scale), torch.bfloat16)
    for o, x in zip(out, xs):
        assert o.shape == x.shape and o.stride() == x.stride() and o.dtype == torch.bfloat16


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_registry_cases(device):
    results = registry_results("scale_many", device, seed=500)
    assert len({r.case for r in results}) == 4
    assert all(r.passed for r in results), [r for r in results if not r.passed]
