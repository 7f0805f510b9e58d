"""Count before timing: FLOPs of DETR's training step and the memory traffic that fusing the backbone's bias + ReLU
removes. Runs on meta tensors (no device, seconds on any machine).

    python benchmarks/count_step.py [--batch 8 --height 800 --width 1333 --backbone resnet50]

Prints (1) the forward + backward FLOPs per step by module (torch.utils.flop_counter.FlopCounterMode over the
model's forward and a backward from its outputs; the matcher and the losses are negligible next to them) and the
time they take at a given rate, and (2) for the ResNet trunk with folded FrozenBatchNorm, the bytes eager PyTorch
moves for the convolutions' bias adds, residual adds and ReLUs against what detr_fast.ops.bias_act moves, and the
launches it saves (forward; the backward is the same for both).

    python benchmarks/count_step.py --roofline ref_tf32,fast,fast_fused   # (3) the step's per-operator floor

(3) counts the whole training step of bench_step.py's variants (forward, set loss, backward, clipping, AdamW, after
one uncounted step that creates the optimizer state) on fake tensors: every operator that launches work, the bytes
it must move (its tensor inputs read once, and written once what its schema mutates, else its outputs) and its FLOPs (torch's FLOP formulas; our attention
kernels' matrix products added by hand, the backward recomputing the scores), grouped by kind. Each operator's
floor is the largest of bytes / bandwidth, FLOPs / the rate of its dtype and a minimum kernel time; their sum is the
floor of the step as these operators, none faster than its own roofline, none fused further, no launch gaps: what
a CUDA-graph replay of that step could at best reach. The fake tensors are CPU tensors under CPU autocast (bf16);
where CPU and CUDA kernels differ (torch's CPU dropout is three operators, CUDA's one) the counts follow the CPU.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


def step_flops(cfg, batch: int, height: int, width: int) -> dict:
    """{part: FLOPs} of one forward + backward on meta tensors: the total and DETR's top-level parts (the parts
    can add up to slightly more than the total: a backward op is credited to every module active when it runs)."""
    from detr_fast.models import build_detr

    model = build_detr(cfg).to("meta")
    images = torch.empty(batch, 3, height, width, device="meta")
    mask = torch.zeros(batch, height, width, dtype=torch.bool, device="meta")
    counter = FlopCounterMode(display=False, depth=4)
    with counter:
        out = model(images, mask)
        heads = [out] + out.get("aux_outputs", [])
        loss = sum(o["pred_logits"].float().sum() + o["pred_boxes"].sum() for o in heads)
        loss.backward()
    per_module = {name: sum(c.values()) for name, c in counter.get_flop_counts().items()}
    parts = {"total": counter.get_total_flops()}
    for key, name in (("backbone", "DETR.backbone"), ("input_proj", "DETR.input_proj"),
                      ("transformer", "DETR.transformer"), ("class_embed", "DETR.class_embed"),
                      ("bbox_embed", "DETR.bbox_embed")):
        parts[key] = per_module.get(name, 0)
    return parts


def bias_relu_traffic(batch: int, height: int, width: int, backbone: str, elem_bytes: int = 2) -> dict:
    """Forward bytes and launches of the folded trunk's bias adds, residual adds and ReLUs: eager against fused.

    Eager, per conv followed by ReLU: bias add_ (read + write) and relu_ (read + write) = 4 passes; at a block's end:
    bias add_ (2), the downsample's bias add_ (2), the residual add_ (3: two reads, one write) and relu_ (2). Fused:
    one read and one write per conv, and at a block's end one read of the conv output, one of the identity and one
    write (the downsample's bias joins the block's bias)."""
    import torchvision
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from torchvision.ops.misc import FrozenBatchNorm2d

    net = getattr(torchvision.models, backbone)(weights=None, norm_layer=FrozenBatchNorm2d).to("meta")
    tally = {"eager_bytes": 0, "fused_bytes": 0, "eager_launches": 0, "fused_launches": 0}

    def add(eager_passes, fused_passes, elems, eager_launches, fused_launches):
        tally["eager_bytes"] += eager_passes * elems * elem_bytes
        tally["fused_bytes"] += fused_passes * elems * elem_bytes
        tally["eager_launches"] += eager_launches
        tally["fused_launches"] += fused_launches

    def block_hook(block, inputs, output):
        n, _, h, w = inputs[0].shape
        inner = [block.conv1] + ([block.conv2] if isinstance(block, Bottleneck) else [])
        for conv in inner:  # each followed by bias + ReLU
            s = conv.stride[0]
            h, w = (h + s - 1) // s, (w + s - 1) // s  # 3x3 / padding 1 or 1x1: ceil(size / stride)
            add(4, 2, n * conv.weight.shape[0] * h * w, 2, 1)
        ds = block.downsample is not None
        add(7 + 2 * ds, 3, output.numel(), 3 + ds, 1)

    for m in net.modules():
        if isinstance(m, (Bottleneck, BasicBlock)):
            m.register_forward_hook(block_hook)
    net.conv1.register_forward_hook(lambda mod, i, o: add(4, 2, o.numel(), 2, 1))
    net(torch.empty(batch, 3, height, width, device="meta"))
    return tally


# (kind, substrings of the operator name), first match wins
ROOF_KINDS = [
    ("attention", ("detr_fast.attention", "softmax", "bmm", "baddbmm")),
    ("convolution", ("convolution",)),
    ("matmul", ("aten.mm", "aten.addmm", "aten.linear")),
    ("norm", ("layer_norm", "layernorm")),
    ("fused trunk/FFN", ("detr_fast.bias_act", "detr_fast.relu_dropout", "detr_fast.relu_backward_sum")),
    ("matching+loss", ("matching_cost", "linear_assignment", "box_loss", "cross_entropy", "nll_loss")),
    ("optimizer+clip", ("adamw", "_foreach", "vector_norm", "clip")),
    ("casts+copies", ("_to_copy", "copy_", "aten.cat", "aten.stack", "clone", "contiguous")),
]


def roof_kind(name: str) -> str:
    for kind, keys in ROOF_KINDS:
        if any(k in name for k in keys):
            return kind
    return "elementwise+other"


def _attention_flops(name: str, args) -> float:
    if name == "detr_fast.attention":  # q [B, H, Lq, D], k [B, H, Lk, D]: S = QK^T and O = PV
        q, k = args[0], args[1]
        return 4.0 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
    if name == "detr_fast.attention_backward":  # S again, dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q
        q, k = args[1], args[2]
        return 10.0 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
    return 0.0


# operators that only write their output (no input bytes are read)
_WRITE_ONLY = {"aten.zeros_like", "aten.zeros", "aten.ones_like", "aten.full_like", "aten.full", "aten.zero_",
               "aten.fill_", "aten.scalar_tensor", "aten.arange"}


def step_roofline(variant: str, batch: int, height: int, width: int, backbone: str) -> list:
    """[(operator name, bytes, FLOPs, dtype of its first output)] for one training step of a bench_step variant,
    counted on fake tensors after one uncounted step."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.flop_counter import flop_registry

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_step

    import detr_fast.ops
    from detr_fast.models import fold

    images, mask, targets = bench_step.make_batch(batch, height, width, 91, "cpu")
    torch.manual_seed(0)
    cfg, model, crit = bench_step.build(["model.num_classes=91", f"model.backbone={backbone}", "model.dropout=0.1"],
                                        variant, "cpu")
    if getattr(model, "trunk_fold", None) is not None:
        model.trunk_fold.prepare()  # its host-made index, before the tensors turn fake
    if variant.startswith("ref"):  # the reference matcher and box loss check their inputs on the host (and the
        # matcher solves there), which fake tensors cannot do: count our kernels in their place (a few MB of the
        # reference step's traffic, 3 of its operators against the dozens the reference runs)
        crit.ops = crit.matcher.ops = detr_fast.ops
    mode = FakeTensorMode()
    for m in list(model.modules()) + list(crit.modules()):
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(mode.from_tensor(p.detach()), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = mode.from_tensor(b)
    v = bench_step.VARIANTS[variant]
    rows = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = str(func.overloadpacket)
            if not bench_step.launches_work(func):
                return out
            ins = [] if name in _WRITE_ONLY else [
                t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            # written: the arguments the schema mutates (in-place and out= operators, the fused optimizer), else
            # the outputs
            mutated = [a.name for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
            if mutated:
                named = dict(zip((a.name for a in func._schema.arguments), args), **kwargs)
                written = [t for n in mutated for t in tree_flatten(named.get(n))[0] if isinstance(t, torch.Tensor)]
            else:
                written = outs
            nbytes = sum(t.numel() * t.element_size() for t in ins + written)
            flops = _attention_flops(name, args)
            if func.overloadpacket in flop_registry:
                try:
                    flops = float(flop_registry[func.overloadpacket](*args, **kwargs, out_val=out))
                except Exception:  # a formula that does not take these arguments: no FLOPs credited
                    flops = 0.0
            rows.append((name, nbytes, flops, outs[0].dtype if outs else None))
            return out

    capturing = fold._capturing
    fold._capturing = lambda *a: False  # eager steps (the capture path asks the CUDA runtime)
    try:
        # the folded-BatchNorm caches key on data_ptr, which fake tensors answer with a deprecation warning
        with warnings.catch_warnings(), mode:
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            f_images, f_mask = mode.from_tensor(images), mode.from_tensor(mask)
            f_targets = {k: mode.from_tensor(t) for k, t in targets.items()}
            step = bench_step.make_step(model, crit, cfg, v["amp"], "cpu", fused_opt=v["kernels"] == "fused")
            step(f_images, f_mask, f_targets)
            with Count():
                step(f_images, f_mask, f_targets)
    finally:
        fold._capturing = capturing
    return rows


def roofline_table(rows: list, tbps: float, rates: dict, min_us: float) -> dict:
    """{kind: {ops, GB, TFLOP, floor_ms}} plus "total"; rates: TFLOP/s by dtype (matrix operators), others at
    rates["other"]."""
    out: dict = {}
    for name, nbytes, flops, dtype in rows:
        kind = roof_kind(name)
        rate = rates.get(str(dtype).replace("torch.", ""), rates["other"]) if flops else rates["other"]
        floor = max(nbytes / (tbps * 1e12), flops / (rate * 1e12), min_us * 1e-6)
        for key in (kind, "total"):
            d = out.setdefault(key, {"ops": 0, "GB": 0.0, "TFLOP": 0.0, "floor_ms": 0.0})
            d["ops"] += 1
            d["GB"] += nbytes / 1e9
            d["TFLOP"] += flops / 1e12
            d["floor_ms"] += floor * 1e3
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--height", type=int, default=800)
    ap.add_argument("--width", type=int, default=1333)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--tflops", type=float, default=989.0, help="arithmetic rate for the floor (H100 dense bf16)")
    ap.add_argument("--tbps", type=float, default=2.8, help="memory bandwidth for the traffic time, TB/s")
    ap.add_argument("--roofline", default="", metavar="VARIANTS",
                    help="instead: the per-operator floor of bench_step variants' whole training step (see above)")
    ap.add_argument("--bf16-tflops", type=float, default=798.0,
                    help="bf16 matrix rate for --roofline (an H100 of the lent kind: 798 measured on 8192^3)")
    ap.add_argument("--tf32-tflops", type=float, default=400.0, help="fp32 matrix rate with TF32 for --roofline")
    ap.add_argument("--fp32-tflops", type=float, default=50.0, help="rate of other arithmetic for --roofline")
    ap.add_argument("--min-us", type=float, default=2.0,
                    help="least time of any kernel for --roofline (a graph replay's launch and tail), microseconds")
    a = ap.parse_args(argv)
    if a.roofline:
        return roofline_main(a)
    from detr_fast.config import load_config

    cfg = load_config(None, [f"model.backbone={a.backbone}", "model.fold_bn=false"])
    flops = step_flops(cfg, a.batch, a.height, a.width)
    print(f"DETR {a.backbone}, batch {a.batch} x 3 x {a.height} x {a.width}: forward + backward FLOPs per step")
    for k, v in flops.items():
        print(f"  {k:12s} {v / 1e12:8.3f} TFLOP")
    print(f"  floor at {a.tflops:g} TFLOP/s: {flops['total'] / (a.tflops * 1e12) * 1e3:.2f} ms")
    t = bias_relu_traffic(a.batch, a.height, a.width, a.backbone)
    saved = t["eager_bytes"] - t["fused_bytes"]
    print(f"trunk bias + residual + ReLU, forward, bf16: eager {t['eager_bytes'] / 1e9:.2f} GB in "
          f"{t['eager_launches']} launches, fused {t['fused_bytes'] / 1e9:.2f} GB in {t['fused_launches']}: "
          f"{saved / 1e9:.2f} GB less, {saved / (a.tbps * 1e12) * 1e3:.2f} ms at {a.tbps:g} TB/s")
    return 0


def roofline_main(a) -> int:
    rates = {"bfloat16": a.bf16_tflops, "float16": a.bf16_tflops, "float32": a.tf32_tflops, "other": a.fp32_tflops}
    print(f"DETR {a.backbone}, batch {a.batch} x 3 x {a.height} x {a.width}, one training step, per-operator floor at "
          f"{a.tbps:g} TB/s, matrix work at {a.bf16_tflops:g} (bf16) / {a.tf32_tflops:g} (fp32 as TF32) TFLOP/s, "
          f"other arithmetic {a.fp32_tflops:g}, at least {a.min_us:g} us per kernel")
    kinds = [k for k, _ in ROOF_KINDS] + ["elementwise+other", "total"]
    for variant in a.roofline.split(","):
        table = roofline_table(step_roofline(variant, a.batch, a.height, a.width, a.backbone), a.tbps, rates,
                               a.min_us)
        print(f"\n{variant}")
        print(f"  {'kind':18s} {'ops':>6s} {'GB':>8s} {'TFLOP':>8s} {'floor ms':>9s}")
        for k in kinds:
            if k in table:
                d = table[k]
                print(f"  {k:18s} {d['ops']:6d} {d['GB']:8.2f} {d['TFLOP']:8.3f} {d['floor_ms']:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
