"""The training loop: `train(cfg)` behind `python -m detr_fast train` (and torchrun for several processes).

One step: batch to the device, forward (optionally under bf16/fp16 autocast), set criterion, weighted sum,
backward, grad-norm clip, AdamW step. Nothing in the step reads a device value on the host: the losses are summed
on the device; every `train.log_every` steps their window is copied to pinned host memory without waiting and shown
once the copy has landed (AsyncReadback), and the epoch's end reads the rest (each read is marked `# host sync`).
The fp16 GradScaler is the one exception: its step checks for infs on the host.

Per epoch: one JSON line in output_dir/log.jsonl, a COCO evaluation every `train.eval_every` epochs and at the
last one (output_dir/eval_epochNNN.json), and output_dir/checkpoint.pth written atomically. `train.resume`
continues a run so that the next step's loss equals that of the uninterrupted run: the checkpoint carries the
optimizer, LR schedule and every rank's RNG states, the loader reshuffles from (seed, epoch), and evaluation does
not consume the training RNG streams.
"""
from __future__ import annotations

import json
import math
import random
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from detr_fast import dist
from detr_fast.checkpoint import (load_checkpoint, load_pretrained, rng_state, save_checkpoint, set_rng_state,
                                  unwrap)
from detr_fast.config import Config, ConfigError, apply_overrides, config_from_dict
from detr_fast.criterion import weighted_total
from detr_fast.evaluation import autocast_context, evaluate, format_stats


# ------------------------------------------------------------------------------------------------- small helpers

def log(msg: str) -> None:
    """Print on rank 0 only."""
    if dist.is_main_process():
        print(msg, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def resolve_device_type(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available (use train.device=cpu or auto)")
    return name


class ProgressBar:
    """A one-line progress bar on stderr: `epoch 3/12  40/125 [#####.....] loss 1.234  156.2 img/s`.

    On a terminal the line is redrawn in place; otherwise (a log file, CI) each update is a plain line.
    Disabled bars (ranks other than 0) print nothing.
    """

    def __init__(self, desc: str, total: int | None, stream=None, enabled: bool = True, width: int = 20):
        self.desc, self.total, self.width, self.enabled = desc, total, width, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._shown = 0

    def render(self, step: int, fields: dict) -> str:
        if self.total:
            done = int(self.width * min(step, self.total) / self.total)
            bar = f"{step}/{self.total} [{'#' * done}{'.' * (self.width - done)}]"
        else:
            bar = f"{step}"
        extra = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) and k != "img/s" else
                          (f"{v:.1f} {k}" if k == "img/s" else f"{k} {v}") for k, v in fields.items())
        return f"{self.desc}  {bar}  {extra}".rstrip()

    def update(self, step: int, **fields) -> None:
        if not self.enabled:
            return
        line = self.render(step, fields)
        if self.tty:
            self.stream.write("\r" + line.ljust(self._shown))
            self._shown = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()
        self._shown = 0


# ----------------------------------------------------------------------------------------------- model building

def build_optimizer(model: nn.Module, cfg: Config, device: torch.device, steps_per_epoch: int = 1):
    """AdamW with DETR's two groups: non-backbone parameters at train.lr, backbone parameters at
    train.lr_backbone (train.lr_backbone <= 0 freezes the backbone). Returns (optimizer, the per-step LR
    scheduler of build_scheduler); steps_per_epoch converts the epoch-based settings into steps."""
    t = cfg.train
    rest, backbone = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (backbone if name.startswith("backbone.") else rest).append(p)
    groups = [{"params": rest, "lr": t.lr}]
    if backbone:
        if t.lr_backbone > 0:
            groups.append({"params": backbone, "lr": t.lr_backbone})
        else:
            for p in backbone:
                p.requires_grad_(False)
    # the fused kernel (CUDA and CPU) updates all parameters in a few calls instead of ~10 ops per tensor: on the
    # shapes config's CPU step it takes 3 ms instead of 12
    # capturable (train.cuda_graph): the step count stays on the device; train() makes the LRs device tensors
    optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay,
                                  fused=device.type in ("cuda", "cpu"),
                                  capturable=t.cuda_graph and device.type == "cuda")
    return optimizer, build_scheduler(optimizer, cfg, steps_per_epoch)


def match_param_groups(optimizer, capturable: bool) -> None:
    """After optimizer.load_state_dict: set each param group's capturable flag to this run's and its LR back to a
    Python float (a checkpoint of a CUDA-graph run holds LR tensors; a graph run turns floats into device tensors
    afterwards). Capturing a step whose groups say capturable=False fails, and a non-capturable step with tensor LRs
    warns; both happen when a run resumes from a checkpoint written with the other train.cuda_graph setting."""
    for g in optimizer.param_groups:
        g["capturable"] = bool(capturable)
        g["lr"] = float(g["lr"])  # a CPU tensor here (checkpoints load to the CPU): no device read


def lr_factor(step: int, cfg: Config, steps_per_epoch: int) -> float:
    """The LR multiplier before optimizer step `step` (0-based): linear warm-up over train.warmup_steps, times
    the schedule evaluated at the fractional epoch step / steps_per_epoch ("step": 0.1 from epoch train.lr_drop on;
    "cosine": from 1 down to train.lr_min_factor at train.epochs)."""
    t = cfg.train
    warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps > 0 else 1.0
    epoch = step / max(steps_per_epoch, 1)
    if t.lr_schedule == "cosine":
        frac = min(epoch / max(t.epochs, 1), 1.0)
        sched = t.lr_min_factor + (1.0 - t.lr_min_factor) * 0.5 * (1.0 + math.cos(math.pi * frac))
    else:
        sched = 0.1 if epoch >= max(t.lr_drop, 1) else 1.0
    return warm * sched


def build_scheduler(optimizer, cfg: Config, steps_per_epoch: int):
    """A LambdaLR stepped once per optimizer step (train_one_epoch does it), following lr_factor. Plain Python
    floats: stepping it never touches the device."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, steps_per_epoch))


def _default_model(cfg):
    from detr_fast.models import build_detr
    return build_detr(cfg)


def _default_criterion(cfg):
    from detr_fast.criterion import build_criterion
    return build_criterion(cfg)


def _default_loader(cfg, split, distributed=False, rank=0, world_size=1):
    from detr_fast.data import build_loader
    return build_loader(cfg, split, distributed=distributed, rank=rank, world_size=world_size)


def _prepare_data(cfg) -> None:
    from detr_fast.data import ensure_dataset
    ensure_dataset(cfg)


# --------------------------------------------------------------------------------------------------- one epoch

def steps_per_epoch(loader, cfg: Config) -> int:
    """Optimizer steps in one epoch (what converts epoch-based LR settings into steps): the loader's length,
    capped by train.max_steps_per_epoch."""
    n = len(loader) if hasattr(loader, "__len__") else 0
    cap = cfg.train.max_steps_per_epoch
    if cap:
        n = min(n, cap) if n else cap
    if n <= 0:
        raise ValueError("the training loader has no length and train.max_steps_per_epoch is 0: cannot place "
                         "the LR schedule; set train.max_steps_per_epoch")
    return n


def _set_loader_epoch(loader, epoch: int) -> None:
    """Tell the sampler which epoch it is, so the shuffle comes from (seed, epoch)."""
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None),
                getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
            return


def train_step(model, criterion, batch, optimizer, *, amp_ctx, scaler, clip_max_norm: float, weights=None,
               keys=None):
    """One optimization step on one batch (already on the device). No host sync (except fp16's GradScaler).

    Returns (keys, weights, row): the loss names (SetCriterion's order: layer by layer), their weights [K] and the
    detached row [1 + K] = (weighted total, each loss) on the device.
    """
    with amp_ctx():
        out = model(batch.images, batch.mask)
    losses = criterion(out, batch.targets)  # the criterion computes in fp32 outside autocast
    total, keys, weights, vals = weighted_total(losses, criterion.weight_dict, keys, weights)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if clip_max_norm > 0:
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, clip_max_norm)  # returns a device tensor; not read
    scaler.step(optimizer)
    scaler.update()
    return keys, weights, torch.cat((total.detach()[None], vals.detach()))


class AsyncReadback:
    """Reads small device tensors (the loss window) without stalling the device: push() queues a copy into pinned
    host memory and records an event; ready() returns the values whose copies have finished (all of them, waiting,
    with wait=True). On the CPU the values are ready at once. So on a GPU the loss shown lags one log window behind
    the step that computed it, and the step loop never waits for the device."""

    def __init__(self):
        self.pending: list = []

    def push(self, t: torch.Tensor, payload) -> None:
        t = t.detach()
        if t.is_cuda:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending.append((host, event, payload))
        else:
            self.pending.append((t.clone(), None, payload))

    def ready(self, wait: bool = False) -> list:
        out = []
        while self.pending:
            host, event, payload = self.pending[0]
            if event is not None and not event.query():
                if not wait:
                    break
                event.synchronize()  # host sync: only at the epoch's end (wait=True)
            self.pending.pop(0)
            out.append((host.tolist(), payload))  # sync: none, a host tensor whose copy has landed
        return out


def _show_window(bar, epoch: int, keys, win: list, at_step: int, rate: float) -> int:
    """Show one loss window on the progress bar (stop on a non-finite loss); returns the step it belongs to."""
    if not math.isfinite(win[0]):
        raise FloatingPointError(f"epoch {epoch} step {at_step}: loss is {win[0]} ({dict(zip(keys, win[1:]))}); "
                                 "stopping")
    bar.update(at_step, loss=win[0], **{"img/s": rate})
    return at_step


class GraphRunner:
    """train.cuda_graph: the training step as one CUDA graph per padded batch shape (detr_fast.graphs.GraphedStep).
    The first batch of a new shape is trained on eagerly (as the capture's warm-up), later ones replay the graph.

    The loss names and weights are fixed by the run's very first step and kept here for the runner's life: every
    graph reads the weights tensor at the address it was captured with, so that tensor must outlive all of them
    (a per-epoch tensor would be freed at the epoch's end while later replays still read its memory)."""

    def __init__(self, model, criterion, optimizer, *, amp_ctx, scaler, clip_max_norm: float):
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.kw = dict(amp_ctx=amp_ctx, scaler=scaler, clip_max_norm=clip_max_norm)
        self.graphs: dict = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.keys = self.weights = None

    def step(self, batch):
        """-> (keys, weights, row) as train_step; row is a fresh tensor (not the graph's output buffer)."""
        from types import SimpleNamespace

        from detr_fast.graphs import GraphedStep

        if self.keys is None:  # the run's very first step: eager, it fixes the loss names and weights
            self.keys, self.weights, row = train_step(self.model, self.criterion, batch, self.optimizer, **self.kw)
            return self.keys, self.weights, row
        keys, weights = self.keys, self.weights

        def step_fn(images, mask, targets):
            b = SimpleNamespace(images=images, mask=mask, targets=targets)
            return train_step(self.model, self.criterion, b, self.optimizer, weights=weights, keys=keys,
                              **self.kw)[2]

        shape = (tuple(batch.images.shape), tuple(batch.targets["labels"].shape))
        inputs = (batch.images, batch.mask, batch.targets)
        graph = self.graphs.get(shape)
        if graph is None:
            graph = self.graphs[shape] = GraphedStep(step_fn, inputs, warmup=1, pool=self.pool)
            return keys, weights, graph.warmup_outputs
        return keys, weights, graph(*inputs).clone()


def train_one_epoch(model, criterion, loader, optimizer, device, epoch: int, cfg: Config, *, amp_ctx, scaler,
                    bar: ProgressBar, lr_scheduler=None, graph_runner: GraphRunner | None = None) -> dict:
    """Train one epoch, stepping lr_scheduler (when given) after each optimizer step; returns {loss, loss_ce, ...
    (means over the epoch and all ranks), steps, images, skipped, time_s, img_per_s}."""
    t = cfg.train
    model.train()
    criterion.train()
    steps_total = len(loader) if hasattr(loader, "__len__") else 0
    if t.max_steps_per_epoch:
        steps_total = min(steps_total, t.max_steps_per_epoch) if steps_total else t.max_steps_per_epoch
    bar.total = steps_total or None
    keys = weights = None
    epoch_sum = win_sum = None
    steps = win_steps = images = win_images = skipped = last_shown = 0
    readback = AsyncReadback()
    pad = bool(cfg.data.pad_to or cfg.data.max_targets)
    if pad:
        from detr_fast.data import pad_batch
    t_epoch = t_win = time.perf_counter()
    for step, batch in enumerate(loader):
        if t.max_steps_per_epoch and step >= t.max_steps_per_epoch:
            break
        skipped += int(getattr(batch, "skipped", 0))
        n_img = batch.images.shape[0]
        if n_img == 0:  # every image of the batch was unreadable
            if dist.get_world_size() > 1:  # skipping the step on one rank alone would leave the others waiting
                raise RuntimeError(f"epoch {epoch} step {step}: rank {dist.get_rank()} got a batch whose images "
                                   "were all unreadable; fix or remove those files")
            continue
        batch = batch.to(device, non_blocking=True)
        if pad:
            batch = pad_batch(batch, cfg.data.pad_to, cfg.data.max_targets)  # fixed shapes (on the device)
        if graph_runner is not None:
            keys, weights, row = graph_runner.step(batch)
        else:
            keys, weights, row = train_step(model, criterion, batch, optimizer, amp_ctx=amp_ctx, scaler=scaler,
                                            clip_max_norm=t.clip_max_norm, weights=weights, keys=keys)
        if lr_scheduler is not None:
            with warnings.catch_warnings():
                # fp16: GradScaler skips the optimizer step while it calibrates its scale; torch then warns that
                # the scheduler stepped first, which is expected here
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
                lr_scheduler.step()
        epoch_sum = row if epoch_sum is None else epoch_sum + row
        win_sum = row if win_sum is None else win_sum + row
        steps, win_steps = steps + 1, win_steps + 1
        images, win_images = images + n_img, win_images + n_img
        if t.log_every > 0 and steps % t.log_every == 0:
            now = time.perf_counter()
            readback.push(win_sum / win_steps, (steps, win_images / max(now - t_win, 1e-9)))
            for win, (at_step, rate) in readback.ready():
                last_shown = _show_window(bar, epoch, keys, win, at_step, rate)
            win_sum, win_steps, win_images, t_win = None, 0, 0, now
    for win, (at_step, rate) in readback.ready(wait=True):  # the epoch ends with a host read anyway
        last_shown = _show_window(bar, epoch, keys, win, at_step, rate)
    if epoch_sum is None:
        raise RuntimeError(f"epoch {epoch}: the training loader yielded no batch")
    # epoch means, averaged over ranks; image and skip counts summed over ranks
    stats = torch.cat((epoch_sum / steps, torch.tensor([images, skipped], dtype=epoch_sum.dtype, device=device)))
    dist.all_reduce_sum_(stats)
    stats = stats.tolist()  # host sync: epoch end
    elapsed = time.perf_counter() - t_epoch
    world = dist.get_world_size()
    k = len(keys) + 1
    means = [v / world for v in stats[:k]]
    if not math.isfinite(means[0]):
        raise FloatingPointError(f"epoch {epoch}: mean loss is {means[0]}; stopping")
    if bar.tty or last_shown != steps:  # the epoch means (a plain-text log already holds the last window's line)
        bar.update(steps, loss=means[0], **{"img/s": stats[k] / max(elapsed, 1e-9)})
    bar.close()
    result = {"loss": means[0], **dict(zip(keys, means[1:]))}
    result.update(steps=steps, images=int(stats[k]), skipped=int(stats[k + 1]), time_s=elapsed,
                  img_per_s=stats[k] / max(elapsed, 1e-9))
    return result


# ------------------------------------------------------------------------------------------------------- train

def _evaluate_keeping_rng(model, loader, device, amp, path) -> tuple[dict, str]:
    """COCO evaluation that leaves every RNG stream as it found it (so evaluating or not does not change the
    training that follows). Returns (stats, the 12-line table; empty on ranks other than 0)."""
    state = rng_state()
    printed: list[str] = []
    try:
        return evaluate(model, loader, device, amp=amp, output_path=path, log=printed.append), "\n".join(printed)
    finally:
        set_rng_state(state)


def train(cfg: Config, *, model_fn: Callable | None = None, criterion_fn: Callable | None = None,
          loader_fn: Callable | None = None) -> dict:
    """Train (and evaluate) DETR as cfg says; returns {"epochs": [per-epoch records], "eval": last AP dict,
    "output_dir": str}. model_fn(cfg), criterion_fn(cfg) and loader_fn(cfg, split, distributed, rank,
    world_size) replace the default builders (tests use them); with the default loader the dataset is prepared
    (the shapes set generated) first."""
    t = cfg.train
    device_type = resolve_device_type(t.device)
    rank, world, local_rank = dist.init_distributed(device_type)
    device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device()) \
        if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        # TF32 matmuls/convolutions, as in the reference measurements (DESIGN.md section 4)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = t.cudnn_benchmark  # train.cudnn_benchmark (config.py)
    main = dist.is_main_process()
    out_dir = Path(t.output_dir)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(t.seed + rank)

    if loader_fn is None:
        if main:
            _prepare_data(cfg)
        dist.barrier()
        loader_fn = _default_loader
    train_loader = loader_fn(cfg, "train", distributed=world > 1, rank=rank, world_size=world)
    val_loader = loader_fn(cfg, "val", distributed=world > 1, rank=rank, world_size=world)

    model = (model_fn or _default_model)(cfg).to(device)
    criterion = (criterion_fn or _default_criterion)(cfg).to(device)
    if t.pretrained and not t.resume:
        load_pretrained(model, t.pretrained, log=log)
    optimizer, lr_scheduler = build_optimizer(model, cfg, device, steps_per_epoch(train_loader, cfg))
    scaler = torch.amp.GradScaler(device.type, enabled=t.amp == "fp16")
    amp_ctx = autocast_context(device, t.amp)

    start_epoch = 0
    if t.resume:
        ckpt = load_checkpoint(t.resume, map_location="cpu")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        if "scaler" in ckpt and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch = int(ckpt.get("loader_epoch", ckpt["epoch"] + 1))
        rngs = ckpt.get("rng") or []
        if len(rngs) == world:
            set_rng_state(rngs[rank])
        else:
            warnings.warn(f"{t.resume} holds RNG states for {len(rngs)} processes, this run has {world}; "
                          "reseeding from train.seed and the epoch", stacklevel=2)
            seed_everything(t.seed + rank + 1000 * start_epoch)
        # the saved param groups carry the saving run's capturable flag (and, saved under train.cuda_graph, LRs as
        # tensors): this run's settings win (the cuda_graph block below makes the LRs device tensors again)
        match_param_groups(optimizer, capturable=t.cuda_graph and device.type == "cuda")
        log(f"resumed from {t.resume}: epoch {start_epoch} of {t.epochs}")
    graph_runner = None
    if t.cuda_graph:
        from detr_fast.ops import has_kernel

        if device.type != "cuda" or world > 1:
            raise ConfigError("train.cuda_graph needs a GPU and a single process (got "
                              f"{device.type}, {world} process(es))")
        if not (has_kernel("linear_assignment", "cuda") and has_kernel("matching_cost", "cuda")
                and cfg.model.kernels == "fused"):
            raise ConfigError("train.cuda_graph needs the CUDA matcher kernels (model.kernels=fused, built with "
                              "CUDA): the reference matcher copies to the host")
        # replayed graphs read the LRs from the device: tensors the scheduler fills in place (after any resume,
        # whose optimizer state holds them as floats)
        for g in optimizer.param_groups:
            g["lr"] = torch.tensor(float(g["lr"]), device=device)
        graph_runner = GraphRunner(model, criterion, optimizer, amp_ctx=amp_ctx, scaler=scaler,
                                   clip_max_norm=t.clip_max_norm)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                    else None)

    n_params = sum(p.numel() for p in unwrap(model).parameters() if p.requires_grad)
    log(f"detr_fast train: {world} process(es) on {device.type}, {n_params / 1e6:.2f} M trainable parameters, "
        f"epochs {start_epoch}..{t.epochs - 1}, output {out_dir}")
    log_path = out_dir / "log.jsonl"
    if main and start_epoch == 0 and log_path.exists():
        log_path.unlink()  # a fresh run in this folder starts a fresh log

    t_start = time.time()
    longest_epoch = 0.0
    records, last_eval, last_table = [], {}, ""
    for epoch in range(start_epoch, t.epochs):
        _set_loader_epoch(train_loader, epoch)
        bar = ProgressBar(f"epoch {epoch + 1}/{t.epochs}", None, enabled=main)
        t_epoch_start = time.time()
        # at the epoch's first step (train.cuda_graph keeps them as device tensors: one read per epoch)
        lrs = [float(g["lr"]) for g in optimizer.param_groups]
        stats = train_one_epoch(model, criterion, train_loader, optimizer, device, epoch, cfg, amp_ctx=amp_ctx,
                                scaler=scaler, bar=bar, lr_scheduler=lr_scheduler, graph_runner=graph_runner)
        # stop when the next epoch, as long as the longest one so far, would end past the limit (an epoch is the
        # unit of the schedule and the checkpoint, so the run never overshoots by more than its variation)
        longest_epoch = max(longest_epoch, time.time() - t_epoch_start)
        over_time = bool(t.time_limit_min > 0 and epoch < t.epochs - 1
                         and time.time() - t_start + longest_epoch > 60.0 * t.time_limit_min)
        over_time = bool(dist.broadcast_object(over_time))
        last = epoch == t.epochs - 1 or over_time
        rec = {"epoch": epoch, "train_loss": stats["loss"]}
        rec.update({f"train_{k}": v for k, v in stats.items() if k.startswith("loss_")})
        rec.update(lr=lrs[0], lr_backbone=lrs[1] if len(lrs) > 1 else None, img_per_s=stats["img_per_s"],
                   epoch_time_s=stats["time_s"], steps=stats["steps"], images=stats["images"],
                   skipped=stats["skipped"])
        if (t.eval_every > 0 and (epoch + 1) % t.eval_every == 0) or last:
            last_eval, last_table = _evaluate_keeping_rng(model, val_loader, device, t.amp,
                                                          out_dir / f"eval_epoch{epoch:03d}.json")
            rec.update(last_eval)
            rec["eval_epoch"] = epoch
        rngs = dist.all_gather_object(rng_state())
        if main:
            save_checkpoint(out_dir / "checkpoint.pth", model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                            epoch=epoch, config=cfg.to_dict(), rng=rngs, scaler=scaler)
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            msg = (f"epoch {epoch + 1}/{t.epochs}: loss {stats['loss']:.4f}  {stats['img_per_s']:.1f} img/s  "
                   f"{stats['time_s']:.0f} s")
            if stats["skipped"]:
                msg += f"  skipped images {stats['skipped']}"
            if "AP" in rec:
                msg += f"  | {format_stats(last_eval)}"
            log(msg)
        records.append(rec)
        if over_time:
            log(f"stopping after epoch {epoch + 1}: another epoch would end past the time limit of "
                f"{t.time_limit_min} min")
            break
    if main and records:
        try:
            from detr_fast.plot import plot_curves

            png = plot_curves(log_path, out_dir / "curves.png")
            log(f"curves: {png}")
        except Exception as exc:  # a plotting problem must not lose a finished run
            warnings.warn(f"could not draw the training curves: {exc}", stacklevel=2)
        if last_eval:
            log(f"COCO evaluation after epoch {records[-1]['epoch'] + 1} "
                f"({out_dir / ('eval_epoch%03d.json' % records[-1]['epoch'])}):")
            log(last_table)
    dist.barrier()
    return {"epochs": records, "eval": last_eval, "output_dir": str(out_dir)}


def evaluate_checkpoint(cfg: Config | None, checkpoint: str, overrides: list[str] | None = None,
                        output: str | None = None, loader_fn: Callable | None = None) -> dict:
    """`detr-fast eval`: load weights (official DETR or ours) and run the COCO evaluation on the val split.

    cfg None: the config stored in a detr_fast checkpoint, with `overrides` applied.
    """
    if cfg is None:
        from detr_fast.checkpoint import load_file

        stored = load_file(checkpoint).get("config")
        if stored is None:
            raise ConfigError(f"{checkpoint} holds no config; pass --config")
        cfg = apply_overrides(config_from_dict(stored), overrides or [])
    device_type = resolve_device_type(cfg.train.device)
    rank, world, local_rank = dist.init_distributed(device_type)
    device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device()) \
        if device_type == "cuda" else torch.device("cpu")
    model = _default_model(cfg).to(device)
    load_pretrained(model, checkpoint, log=log)  # before the data: a bad checkpoint fails fast
    if loader_fn is None:
        if dist.is_main_process():
            _prepare_data(cfg)
        dist.barrier()
        loader_fn = _default_loader
    loader = loader_fn(cfg, "val", distributed=world > 1, rank=rank, world_size=world)
    out = Path(output) if output else Path(cfg.train.output_dir) / "eval.json"
    stats = evaluate(model, loader, device, amp=cfg.train.amp, output_path=out, log=log)
    log(f"saved {out}")
    return stats
