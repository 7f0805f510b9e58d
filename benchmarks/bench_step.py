"""Full DETR training step: the reference path against the fast path, side by side on the same weights and batch.

    python benchmarks/bench_step.py                       # GPU: DETR-R50, batch 8, images up to 800x1333
    python benchmarks/bench_step.py --device cpu --small  # CPU: a small version of the same comparison

A step is forward, set loss with the auxiliary losses, backward, gradient clipping and the AdamW step. Variants:
  ref_fp32      model.kernels=reference, nn.MultiheadAttention math, scipy matcher, unfolded BatchNorm, fp32
  ref_tf32      the same with TF32 matrix math
  ref_compile   torch.compile(reference model), TF32
  fast          our kernels, folded BatchNorm, channels_last, bf16 autocast, TF32
  fast_fp32     the fast path without autocast (TF32 matmuls)
  fast_compile  the fast path with torch.compile(model)
  fast_norm     the fast path with model.fused_norm (fused residual add + dropout + LayerNorm)
  fast_graph    the fast path with the whole step captured as one CUDA graph (detr_fast.graphs.GraphedStep)
  fast_bias     the fast path with model.fused_bias_act (conv bias + residual add + ReLU in one pass per block)
  fast_cast     the fast path with model.flat_cast (the transformer's weights cast to bf16 in one kernel per step)
  fast_proj     the fast path with model.packed_proj (q/k in one GEMM; all cross-attention keys/values in two)
  fast_ffn      the fast path with model.fused_ffn (the FFN's ReLU + dropout as one relu_dropout pass)
  fast_fused    the fast path with all five: model.fused_norm, fused_bias_act, flat_cast, packed_proj, fused_ffn
  fast_tuned    fast_fused with cuDNN autotuning (torch.backends.cudnn.benchmark; the batch shape repeats)
  fast_cudnn    fast_fused with model.conv_fusion (each trunk convolution with its bias (+ residual) + ReLU as one
                cuDNN call; on a GPU only, elsewhere it is fast_fused)
  fast_all      fast_tuned captured as one CUDA graph (a GPU only)
  fast_fused_graph, fast_cudnn_graph   fast_fused and fast_cudnn captured as one CUDA graph
  fast_best_graph   fast_cudnn_graph with bias_grad_mm, nhwc_pool, residual_grad_fusion and stem_space_to_depth:
                the step of configs/detr_r50_coco_fast.yaml (each timed as a gain, benchmarks/RESULTS.md)
  fast_nobits_graph   fast_best_graph with DETR_FAST_ATTN_KEEP_BITS=0: the attention backward draws the dropout
                flags again instead of reading those the forward saved (the same values)
  fast_serialbwd_graph   fast_best_graph with DETR_FAST_ATTN_CONCURRENT_BWD=0: the attention backward's dQ and dK/dV
                kernels one after the other on one stream (the same values)
  fast_s2dcopy_graph   fast_best_graph with the stem's space-to-depth input built by a zero fill and four strided
                copies (as when first timed) instead of the space_to_depth kernel (models/fold.py S2D_KERNEL)
  fast_compile_graph   fast_fused under torch.compile (Inductor), captured as one CUDA graph
  fast_bgrad, fast_bgrad_graph   fast_cudnn with model.bias_grad_mm (linear bias gradients as matrix products),
                eager and as one CUDA graph
  fast_pool_graph   fast_cudnn_graph with model.nhwc_pool (the stem's max pool by detr_fast.ops.max_pool2d_nhwc)
  fast_stem8_graph   fast_cudnn_graph with model.stem_pad_channels=8 (the stem convolution on 8 input channels)
  fast_rgrad_graph   fast_cudnn_graph with model.residual_grad_fusion (each joint between ResNet blocks sums and
                masks its two gradients in one relu_backward_sum pass)
  fast_next_graph   fast_cudnn_graph with all five changes not yet timed on a GPU together: bias_grad_mm, nhwc_pool,
                stem_pad_channels=8, residual_grad_fusion and (as in fast_cudnn_graph) the trainable weights folded by
                scale_many
  fast_cudnn_perconv_graph   fast_cudnn_graph with the trainable trunk weights folded one product per weight each
                way instead of one scale_many launch (models/fold.py TRAINABLE_SCALE_MANY; the same values)
cuDNN autotuning is off in every other variant, as in the public reference.
The fast variants use the fused AdamW (as the engine does); the reference ones torch's default AdamW.
Prints ms/step (median), img/s, ratio to ref_tf32 and ref_compile, peak memory, host syncs per step (counted with
torch.cuda.set_sync_debug_mode on a GPU) and the loss of each path on the same weights and batch (dropout off).
--count-ops adds the operators one eager step dispatches (all, those that launch work, casts).
--breakdown adds each variant's time split into kernel categories (and GPU idle time); benchmarks/plot_results.py
draws it.
--mixed N adds training throughput over N batches of different shapes, as multi-scale training draws them (each
batch's largest image at one of DETR's scales): eager variants run each batch at its own padded size, graph variants
pad it up to fixed sizes (--pad-to, as data.pad_to does in training) and replay one CUDA graph per padded shape, so
the padding they add is paid for in the figure (mixed_pad: padded pixels over the batches' own).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings

import torch

from detr_fast.bench import environment, format_table, median_ms
from detr_fast.config import load_config
from detr_fast.criterion import build_criterion, weighted_total
from detr_fast.models import build_detr, fold

# the five model options of the fast path, each computing the same function (config.py)
FUSIONS = dict(fused_norm=True, fused_bias_act=True, flat_cast=True, packed_proj=True, fused_ffn=True)
# the options two H100 calls of 2026-11-27 timed as gains on top of fast_cudnn_graph (RESULTS.md): with conv_fusion,
# the step of configs/detr_r50_coco_fast.yaml
BEST = dict(conv_fusion=True, bias_grad_mm=True, nhwc_pool=True, residual_grad_fusion=True, stem_space_to_depth=True)

VARIANTS = {
    "ref_fp32": dict(kernels="reference", attention="reference", fold_bn=False, channels_last=False, amp="none",
                     tf32=False, compile=False),
    "ref_tf32": dict(kernels="reference", attention="reference", fold_bn=False, channels_last=False, amp="none",
                     tf32=True, compile=False),
    "ref_compile": dict(kernels="reference", attention="reference", fold_bn=False, channels_last=False, amp="none",
                        tf32=True, compile=True),
    "fast": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16", tf32=True,
                 compile=False),
    "fast_fp32": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="none", tf32=True,
                      compile=False),
    "fast_compile": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16",
                         tf32=True, compile=True),
    "fast_norm": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16", tf32=True,
                      compile=False, fused_norm=True),
    "fast_graph": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16",
                       tf32=True, compile=False, graph=True),
    "fast_bias": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16", tf32=True,
                      compile=False, fused_bias_act=True),
    "fast_cast": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16", tf32=True,
                      compile=False, flat_cast=True),
    "fast_proj": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16", tf32=True,
                      compile=False, packed_proj=True),
    "fast_ffn": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16", tf32=True,
                     compile=False, fused_ffn=True),
    "fast_fused": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16", tf32=True,
                       compile=False, **FUSIONS),
    "fast_tuned": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16", tf32=True,
                       compile=False, **FUSIONS, cudnn_benchmark=True),
    "fast_cudnn": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16", tf32=True,
                       compile=False, **FUSIONS, conv_fusion=True),
    "fast_fused_graph": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16",
                             tf32=True, compile=False, **FUSIONS, graph=True),
    "fast_cudnn_graph": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16",
                             tf32=True, compile=False, **FUSIONS, conv_fusion=True, graph=True),
    "fast_bgrad": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16", tf32=True,
                       compile=False, **FUSIONS, conv_fusion=True, bias_grad_mm=True),
    "fast_bgrad_graph": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16",
                             tf32=True, compile=False, **FUSIONS, conv_fusion=True, bias_grad_mm=True, graph=True),
    "fast_pool_graph": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16",
                            tf32=True, compile=False, **FUSIONS, conv_fusion=True, nhwc_pool=True, graph=True),
    "fast_stem8_graph": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16",
                             tf32=True, compile=False, **FUSIONS, conv_fusion=True, stem_pad_channels=8, graph=True),
    "fast_rgrad_graph": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16",
                             tf32=True, compile=False, **FUSIONS, conv_fusion=True, residual_grad_fusion=True,
                             graph=True),
    "fast_next_graph": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16",
                            tf32=True, compile=False, **FUSIONS, conv_fusion=True, bias_grad_mm=True, nhwc_pool=True,
                            stem_pad_channels=8, residual_grad_fusion=True, graph=True),
    "fast_best_graph": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16",
                            tf32=True, compile=False, **FUSIONS, **BEST, graph=True),
    "fast_nobits_graph": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16",
                              tf32=True, compile=False, **FUSIONS, **BEST, graph=True, attn_keep_bits=False),
    "fast_serialbwd_graph": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16",
                                 tf32=True, compile=False, **FUSIONS, **BEST, graph=True, attn_concurrent_bwd=False),
    "fast_s2dcopy_graph": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16",
                               tf32=True, compile=False, **FUSIONS, **BEST, graph=True, s2d_kernel=False),
    "fast_cudnn_perconv_graph": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True,
                                     amp="bf16", tf32=True, compile=False, **FUSIONS, conv_fusion=True, graph=True,
                                     trainable_scale_many=False),
    "fast_compile_graph": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16",
                               tf32=True, compile=True, **FUSIONS, graph=True),
    "fast_all": dict(kernels="fused", attention="fused", fold_bn=True, channels_last=True, amp="bf16", tf32=True,
                     compile=False, **FUSIONS, cudnn_benchmark=True, graph=True),
}


def make_batch(B, max_h, max_w, num_classes, device, seed=0, min_targets=1, max_targets=30):
    """B images of mixed sizes (each side between 60% and 100% of the maximum) padded to the largest, with a mask
    and 1-30 padded targets each."""
    g = torch.Generator().manual_seed(seed)
    hs = [int(max_h * (0.6 + 0.4 * float(torch.rand(1, generator=g)))) for _ in range(B)]
    ws = [int(max_w * (0.6 + 0.4 * float(torch.rand(1, generator=g)))) for _ in range(B)]
    hs[0], ws[0] = max_h, max_w
    H, W = max(hs), max(ws)
    images = torch.zeros(B, 3, H, W)
    mask = torch.ones(B, H, W, dtype=torch.bool)
    for i, (h, w) in enumerate(zip(hs, ws)):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        mask[i, :h, :w] = False
    n = torch.randint(min_targets, max_targets + 1, (B,), generator=g)
    T = int(n.max())
    labels = torch.randint(0, num_classes, (B, T), generator=g)
    cxcy = torch.rand(B, T, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(B, T, 2, generator=g) * 0.3 + 0.05
    boxes = torch.cat((cxcy, wh), -1)
    valid = torch.arange(T)[None] < n[:, None]
    labels = labels * valid
    boxes = boxes * valid[..., None]
    targets = {"labels": labels.to(device), "boxes": boxes.to(device), "num_targets": n.to(device)}
    return images.to(device), mask.to(device), targets


# DETR's multi-scale training: the shorter side resized to one of these (the longer side at most 1333)
DETR_SCALES = tuple(range(480, 801, 32))


def make_mixed_batches(n, B, max_h, max_w, num_classes, device, seed=100):
    """n batches of different shapes: batch i's largest image is (max_h, max_w) scaled by one of DETR_SCALES / 800,
    its other images 60-100% of that (make_batch), 1-30 targets each."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        s = rng.choice(DETR_SCALES) / 800
        out.append(make_batch(B, max(int(max_h * s), 8), max(int(max_w * s), 8), num_classes, device, seed=seed + i))
    return out


def default_buckets(H, W):
    """Fixed sizes for the graph variants' padding: a 64-pixel grid from 512 at full size (H = 800; 512, 576, ...,
    1280, then 800 and 1333 themselves), scaled with H otherwise (multiples of 8). Under DETR's scales the grid pads
    the batches' largest images by about 5% in pixels (9 shapes), where 640, 800, 1024, 1333 pad by about 21%."""
    step, first = 8 * max(1, round(64 * H / 800 / 8)), 8 * max(1, round(512 * H / 800 / 8))
    return sorted(set(range(first, max(H, W), step)) | {H, W})


@dataclasses.dataclass
class _Inputs:
    images: torch.Tensor
    mask: torch.Tensor
    targets: dict


def pad_inputs(batch, buckets, max_targets):
    """(images, mask, targets) padded as data.pad_to / data.max_targets pad a training batch (data.pad_batch)."""
    from detr_fast.data import pad_batch

    p = pad_batch(_Inputs(*batch), buckets, max_targets)
    return p.images, p.mask, p.targets


def time_mixed(step, batches, device, graph=False, buckets=(), max_targets=0, reps=2) -> dict:
    """Training throughput over `batches` of different shapes: one untimed pass (lazy set-up, cuDNN autotuning of
    each shape; for graph=True the capture of one GraphedStep per padded shape, each after one eager warm-up step),
    then `reps` timed passes; the host clock over whole passes, so every cost of a step counts (for graph variants
    the padding and the input copies too). -> {ms_per_step, img_per_s, pad (padded pixels over the batches' own),
    graphs}."""
    graphs = {}
    if graph:
        from detr_fast.graphs import GraphedStep

        pool = torch.cuda.graph_pool_handle()

        def run(b):
            p = pad_inputs(b, buckets, max_targets)
            key = (tuple(p[0].shape), tuple(p[2]["labels"].shape))
            if key not in graphs:
                graphs[key] = GraphedStep(step, p, warmup=1, pool=pool)
                return
            graphs[key](*p)
    else:
        def run(b):
            step(*b)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for b in batches:
        run(b)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        for b in batches:
            run(b)
    sync()
    ms = (time.perf_counter() - t0) * 1e3 / (reps * len(batches))
    own = sum(b[0].shape[-2] * b[0].shape[-1] for b in batches)
    padded = sum(math.prod(pad_inputs(b, buckets, max_targets)[0].shape[-2:]) for b in batches) if graph else own
    return {"ms_per_step": ms, "img_per_s": batches[0][0].shape[0] * 1e3 / ms, "pad": padded / own,
            "graphs": len(graphs)}


def build(cfg_overrides, variant, device):
    v = VARIANTS[variant]
    sets = list(cfg_overrides) + [f"model.kernels={v['kernels']}", f"model.attention={v['attention']}",
                                  f"model.fold_bn={str(v['fold_bn']).lower()}",
                                  f"model.channels_last={str(v['channels_last']).lower()}"]
    for key in list(FUSIONS) + ["conv_fusion", "bias_grad_mm", "nhwc_pool", "stem_pad_channels",
                                "residual_grad_fusion", "stem_space_to_depth"]:
        if key in v:
            sets.append(f"model.{key}={str(v[key]).lower()}")
    cfg = load_config(None, sets)
    model = build_detr(cfg).to(device)
    criterion = build_criterion(cfg).to(device)
    return cfg, model, criterion


def make_step(model, criterion, cfg, amp, device, fused_opt=False, capturable=False):
    params = [p for p in model.parameters() if p.requires_grad]
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    others = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    opt = torch.optim.AdamW([{"params": others}, {"params": backbone, "lr": cfg.train.lr_backbone}],
                            lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused_opt or None,
                            capturable=capturable)
    wd = criterion.weight_dict
    # the loss names and their weights on the device, made by the first call and reused (as the engine's train_step
    # does): made each step, the weights would be a host-to-device copy, a sync, and not allowed in a graph capture
    named = {}

    def step(images, mask, targets):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp == "bf16"):
            out = model(images, mask)
            losses = criterion(out, targets)
            total, named["keys"], named["weights"], _ = weighted_total(losses, wd, named.get("keys"),
                                                                        named.get("weights"))
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.clip_max_norm)
        opt.step()
        return total.detach()
    return step


def eval_loss(model, criterion, amp, device, images, mask, targets):
    model.eval()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=amp == "bf16"):
        out = model(images, mask)
        losses = criterion(out, targets)
        total = weighted_total(losses, criterion.weight_dict)[0]
    model.train()
    return float(total)


def count_syncs(fn, device) -> int | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


# operators that only make a new tensor header or allocate (no kernel, no memory traffic) besides the schema's views
_NO_KERNEL = {"aten._unsafe_view", "aten.lift_fresh", "aten._reshape_alias", "aten.empty", "aten.empty_like",
              "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided", "profiler._record_function_enter_new",
              "profiler._record_function_exit"}


def launches_work(func) -> bool:
    """Whether a dispatched operator launches work: not a view, not header-only or an allocation, not a prim query."""
    name = str(func.overloadpacket)
    return not getattr(func, "is_view", False) and name not in _NO_KERNEL and not name.startswith("prim.")


def count_ops(fn) -> dict:
    """Operators one call of fn dispatches: {"ops": all aten/custom operators, "compute_ops": those that are not
    views or other header-only operators (each is at least one kernel on a GPU, a few microseconds of host time in
    an eager step), "casts": dtype conversions}. Counted with TorchDispatchMode, deterministic for a given step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = self.compute = self.casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            self.ops += 1
            if launches_work(func):
                self.compute += 1
            self.casts += name == "aten._to_copy"
            return func(*args, **(kwargs or {}))

    with Count() as c:
        fn()
    return {"ops": c.ops, "compute_ops": c.compute, "casts": c.casts}


# Kernel (GPU) or operator (CPU) names -> step-breakdown category; the first pattern that matches wins.
CATEGORIES = [
    ("matching+loss", ("matching_cost", "linear_assignment", "auction", "box_loss", "giou", "lap", "hungarian")),
    ("attention", ("attention", "attn_", "fmha", "flash", "sdpa", "softmax", "efficient_attention", "cudnn_attn",
                   "scaled_dot_product")),
    ("normalization", ("layer_norm", "layernorm", "batch_norm", "batchnorm", "bn_fw", "bn_bw", "welford",
                       "add_dropout_layernorm", "ln_forward", "ln_backward", "ln_column")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "clip_grad", "_fused_adamw", "norm_kernel")),
    ("convolution", ("conv", "cudnn", "implicit", "fprop", "dgrad", "wgrad", "nhwc", "nchw", "winograd")),
    ("matmul", ("gemm", "cutlass", "cublas", "xmma", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "sm90",
                "ampere", "wgmma")),
]


def categorize(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "elementwise+other"


def short_kernel_name(name: str, width: int = 150) -> str:
    """A kernel's name without "void" and its parameter list (template arguments kept: an elementwise kernel's
    functor is one), cut to `width` characters."""
    name = name.replace("(anonymous namespace)", "{anon}")
    depth = 0
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(depth - 1, 0)
        elif ch == "(" and depth == 0 and i > 0:
            name = name[:i]
            break
    return name.removeprefix("void ").strip()[:width]


def step_breakdown(fn, device, iters: int = 3, top: int = 0) -> dict:
    """Where one step's time goes: {category: ms per step} from torch.profiler, plus "step" (wall ms per step) and,
    on a GPU with `top` > 0, "top_kernels": the `top` kernels with the most time (name, ms per step, launches).

    On a GPU the categories sum the CUDA kernels' durations and "idle" is the rest of the step's wall time (host
    syncs, Python and launch gaps leave the GPU waiting). On the CPU they sum the self time of the aten operators.
    """
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    fn()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        wall_ms = (time.perf_counter() - t0) * 1e3 / iters
    out: dict = {}
    if device == "cuda":
        kernels: dict = {}
        for evt in prof.events():
            if evt.device_type == torch.autograd.DeviceType.CUDA:
                cat = categorize(evt.name)
                ms = evt.time_range.elapsed_us() / 1e3 / iters
                out[cat] = out.get(cat, 0.0) + ms
                k = kernels.setdefault(evt.name, [0.0, 0])
                k[0] += ms
                k[1] += 1
        busy = sum(out.values())
        out["idle"] = max(wall_ms - busy, 0.0)
        if top:  # the kernels that take the most time: name (shortened), ms per step, launches per step
            ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
            out["top_kernels"] = [(short_kernel_name(n), round(ms, 3), cnt // iters) for n, (ms, cnt) in ranked]
    else:
        for avg in prof.key_averages():
            if avg.key.startswith(("aten::", "detr_fast::")) and avg.self_cpu_time_total > 0:
                cat = categorize(avg.key)
                out[cat] = out.get(cat, 0.0) + avg.self_cpu_time_total / 1e3 / iters
        out["python+other"] = max(wall_ms - sum(out.values()), 0.0)
    out["step"] = wall_ms
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="resnet18, batch 2, images up to 256x320 (for CPUs)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--backbone", default=None, help="resnet18 / resnet50 (default: resnet18 with --small)")
    ap.add_argument("--size", default=None, help="largest image HxW (default 256x320 with --small, else 800x1333)")
    ap.add_argument("--variants", default="ref_tf32,fast,fast_graph,fast_norm,fast_bias,fast_cast,fast_proj,fast_ffn,"
                                          "fast_fused,fast_tuned,fast_cudnn,fast_all,ref_fp32,ref_compile,"
                                          "fast_compile")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default="")
    ap.add_argument("--count-ops", action="store_true",
                    help="also count the operators one eager step dispatches (ops, compute_ops, casts columns)")
    ap.add_argument("--top-kernels", type=int, default=0, metavar="K",
                    help="with --breakdown on a GPU: also list the K kernels that take the most time")
    ap.add_argument("--breakdown", action="store_true",
                    help="also profile each variant's step and split its time into kernel categories")
    ap.add_argument("--mixed", type=int, default=0, metavar="N",
                    help="also time training over N batches of different shapes (graph variants: padded to --pad-to)")
    ap.add_argument("--mixed-variants", default="",
                    help="the variants --mixed times (default: every variant run but the compiled ones, which would "
                         "recompile for each shape)")
    ap.add_argument("--mixed-reps", type=int, default=2, help="timed passes over the --mixed batches")
    ap.add_argument("--pad-to", default="",
                    help="sizes the graph variants pad each side up to under --mixed (default: a 64-pixel grid from "
                         "512 to 1333 at full size, scaled with the image size)")
    a = ap.parse_args(argv)
    device = a.device
    small = a.small or device == "cpu"
    overrides = ["model.num_classes=91", "model.dropout=0.1"]
    backbone = a.backbone or ("resnet18" if small else "resnet50")
    overrides += [f"model.backbone={backbone}"]
    B, H, W = (a.batch or 2, 256, 320) if small else (a.batch or 8, 800, 1333)
    if a.size:
        H, W = (int(x) for x in a.size.lower().split("x"))
    variants = [v for v in a.variants.split(",") if v]
    print(environment(device), flush=True)
    print(f"batch {B}, images up to {H}x{W}, {backbone}, 6+6 layers, aux loss", flush=True)
    images, mask, targets = make_batch(B, H, W, 91, device)
    mixed_batches, buckets = [], []
    if a.mixed:
        mixed_batches = make_mixed_batches(a.mixed, B, H, W, 91, device)
        buckets = [int(x) for x in a.pad_to.split(",") if x] if a.pad_to else default_buckets(H, W)
        mixed_names = set(v for v in a.mixed_variants.split(",") if v) or {
            v for v in variants if not VARIANTS[v]["compile"]}
        print(f"--mixed: {a.mixed} batches, largest images " + ", ".join(
            f"{b[0].shape[-2]}x{b[0].shape[-1]}" for b in mixed_batches) + f"; graph variants padded to {buckets}",
            flush=True)

    torch.manual_seed(0)
    _, base_model, _ = build(overrides, "ref_fp32", device)
    base_state = copy.deepcopy(base_model.state_dict())
    del base_model
    rows = []
    for name in variants:
        v = VARIANTS[name]
        torch.backends.cuda.matmul.allow_tf32 = v["tf32"]
        torch.backends.cudnn.allow_tf32 = v["tf32"]
        torch.backends.cudnn.benchmark = v.get("cudnn_benchmark", False)  # tuned in the warm-up steps
        fold.TRAINABLE_SCALE_MANY = v.get("trainable_scale_many", True)  # read when a graph is captured
        fold.S2D_KERNEL = v.get("s2d_kernel", True)
        # read by each attention forward on the host (so also when a graph is captured)
        os.environ["DETR_FAST_ATTN_KEEP_BITS"] = "1" if v.get("attn_keep_bits", True) else "0"
        os.environ["DETR_FAST_ATTN_CONCURRENT_BWD"] = "1" if v.get("attn_concurrent_bwd", True) else "0"
        cfg, model, criterion = build(overrides, name, device)
        model.load_state_dict(base_state, strict=True)
        loss = eval_loss(model, criterion, v["amp"], device, images, mask, targets)
        plain = model
        if v["compile"]:
            model = torch.compile(model)
        step = make_step(model, criterion, cfg, v["amp"], device, fused_opt=v["kernels"] == "fused",
                         capturable=v.get("graph", False))
        eager_step = step
        if v.get("graph"):
            if device != "cuda":
                print(f"{name}: skipped (CUDA graphs need a GPU)", flush=True)
                continue
            from detr_fast.graphs import GraphedStep

            try:
                step = GraphedStep(step, (images, mask, targets))
            except Exception as exc:  # report and go on with the other variants
                print(f"{name}: capture failed: {type(exc).__name__}: {exc}", flush=True)
                continue
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        retried = 0
        try:
            ms = median_ms(lambda: step(images, mask, targets), device, warmup=a.warmup, iters=a.iters)
        except Exception as exc:  # report and go on with the other variants
            print(f"{name}: failed: {type(exc).__name__}: {exc}", flush=True)
            if not (v["compile"] and not v.get("graph")):
                continue
            # A compiled eager variant once failed on an H100 (a NaN matching cost in one of its steps, 2026-11-27)
            # where the same variant ran on three other machines: once more from the same weights with a fresh
            # optimizer, the failure reported in the row (retried = 1)
            plain.load_state_dict(base_state, strict=True)
            step = make_step(model, criterion, cfg, v["amp"], device, fused_opt=v["kernels"] == "fused")
            try:
                ms = median_ms(lambda: step(images, mask, targets), device, warmup=a.warmup, iters=a.iters)
            except Exception as exc2:
                print(f"{name}: failed again: {type(exc2).__name__}: {exc2}", flush=True)
                continue
            retried = 1
        syncs = count_syncs(lambda: step(images, mask, targets), device)
        row = {"variant": name, "ms_per_step": ms, "img_per_s": B * 1e3 / ms, "loss_same_batch": loss,
               "syncs_per_step": syncs}
        if retried:
            row["retried"] = 1
        # a replayed graph dispatches nothing, a compiled model its generated kernels (and a dispatch mode around it
        # could cost a recompilation): counted for the eager variants only
        if a.count_ops and not v.get("graph") and not v["compile"]:
            row.update(count_ops(lambda: step(images, mask, targets)))
        if a.breakdown:
            try:
                bd = step_breakdown(lambda: step(images, mask, targets), device, top=a.top_kernels)
                top = bd.pop("top_kernels", [])
                row["breakdown_ms"] = bd
                print(f"{name} breakdown (ms/step): " + ", ".join(f"{k} {v:.1f}" for k, v in bd.items()), flush=True)
                if top:
                    row["top_kernels"] = top
                    print(f"{name} top kernels (ms/step, launches/step):\n" + "\n".join(
                        f"  {ms:7.3f} {cnt:5d}  {kname}" for kname, ms, cnt in top), flush=True)
            except Exception as exc:  # the profile is extra information: never lose the timing for it
                print(f"{name}: breakdown failed: {type(exc).__name__}: {exc}", flush=True)
        if device == "cuda":
            row["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        if mixed_batches and name in mixed_names:
            try:
                m = time_mixed(eager_step, mixed_batches, device, graph=v.get("graph", False), buckets=buckets,
                               max_targets=max(int(b[2]["labels"].shape[1]) for b in mixed_batches),
                               reps=a.mixed_reps)
                row.update({f"mixed_{k}": val for k, val in m.items()})
                print(f"{name} mixed shapes: {m['ms_per_step']:.1f} ms/step, {m['img_per_s']:.1f} img/s, padding "
                      f"x{m['pad']:.3f}" + (f", {m['graphs']} graphs" if m["graphs"] else ""), flush=True)
            except Exception as exc:  # extra information: never lose the fixed-batch figures for it
                print(f"{name}: mixed shapes failed: {type(exc).__name__}: {exc}", flush=True)
        rows.append(row)
        print(f"{name}: {ms:.1f} ms/step", flush=True)
        del model, criterion, step, eager_step
        if device == "cuda":
            torch.cuda.empty_cache()
        _add_ratios(rows)
        if a.json:  # after every variant: a run cut short by a time limit keeps what it measured
            with open(a.json, "w") as f:
                json.dump({"environment": environment(device), "batch": [B, H, W], "rows": rows}, f, indent=1)
    fold.TRAINABLE_SCALE_MANY = fold.S2D_KERNEL = True
    os.environ.pop("DETR_FAST_ATTN_KEEP_BITS", None)
    os.environ.pop("DETR_FAST_ATTN_CONCURRENT_BWD", None)
    cols = ["variant", "ms_per_step", "img_per_s", "x_ref_tf32", "x_ref_compile", "peak_mem_GiB", "syncs_per_step",
            "loss_same_batch"] + (["retried"] if any("retried" in r for r in rows) else []) + (["ops", "compute_ops", "casts"] if a.count_ops else []) + (
            ["mixed_ms_per_step", "mixed_img_per_s", "mixed_x_ref_tf32", "mixed_pad", "mixed_graphs"]
            if a.mixed else [])
    print(format_table(rows, cols))
    return 0


def _add_ratios(rows: list) -> None:
    by = {r["variant"]: r for r in rows}
    for r in rows:
        if "ref_tf32" in by:
            r["x_ref_tf32"] = by["ref_tf32"]["ms_per_step"] / r["ms_per_step"]
        if "ref_compile" in by:
            r["x_ref_compile"] = by["ref_compile"]["ms_per_step"] / r["ms_per_step"]
        if "mixed_ms_per_step" in by.get("ref_tf32", {}) and "mixed_ms_per_step" in r:
            r["mixed_x_ref_tf32"] = by["ref_tf32"]["mixed_ms_per_step"] / r["mixed_ms_per_step"]


if __name__ == "__main__":
    sys.exit(main())
