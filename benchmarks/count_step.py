"""Count before timing: FLOPs of DETR's training step and the memory traffic that fusing the backbone's bias + ReLU
removes. Runs on meta tensors (no device, seconds on any machine).

    python benchmarks/count_step.py [--batch 8 --height 800 --width 1333 --backbone resnet50]

Prints (1) the forward + backward FLOPs per step by module (torch.utils.flop_counter.FlopCounterMode over the
model's forward and a backward from its outputs; the matcher and the losses are negligible next to them) and the
time they take at a given rate, and (2) for the ResNet trunk with folded FrozenBatchNorm, the bytes eager PyTorch
moves for the convolutions' bias adds, residual adds and ReLUs against what detr_fast.ops.bias_act moves, and the
launches it saves (forward; the backward is the same for both).
"""
from __future__ import annotations

import argparse
import sys

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--height", type=int, default=800)
    ap.add_argument("--width", type=int, default=1333)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--tflops", type=float, default=989.0, help="arithmetic rate for the floor (H100 dense bf16)")
    ap.add_argument("--tbps", type=float, default=2.8, help="memory bandwidth for the traffic time, TB/s")
    a = ap.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
