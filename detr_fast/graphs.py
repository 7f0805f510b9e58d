"""A whole training step captured as one CUDA graph and replayed.

    step = make_step(...)                     # forward, loss, backward, clip, optimizer step; returns tensors
    graphed = GraphedStep(step, (images, mask, targets))
    loss = graphed(images, mask, targets)     # copies the inputs into the captured buffers, replays the graph

Replaying removes the per-kernel launch cost and the Python of thousands of small launches, which is what leaves the
GPU idle in the reference step (DESIGN.md section 4). The step must qualify for capture:
- no host-device sync inside it (the fast path has none: tests/test_fast_path.py, the engine's sync-debug test);
- the optimizer keeps its step count on the device (torch.optim.AdamW(..., fused=True, capturable=True));
- random numbers from torch's CUDA generator through philox_cuda_state (dropout in our attention and LayerNorm
  kernels does; torch's own dropout does);
- every replay sees the captured shapes: inputs are copied into static buffers, and a batch of another shape (or
  another number of padded targets) is refused with ValueError. Pad batches to a few fixed sizes (buckets) and keep
  one GraphedStep per bucket.
The step's outputs are the captured output tensors, overwritten by the next replay of this graph or of any graph
that shares its memory pool (clone what you keep).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._pytree import tree_flatten, tree_map


class GraphedStep:
    def __init__(self, step: Callable, example_inputs: tuple, warmup: int = 3, pool=None):
        """step(*inputs) -> tensors; example_inputs: a tuple of tensors / dicts / lists of CUDA tensors. Runs
        `warmup` eager steps on example_inputs on a side stream (they are real steps: with warmup=1 the example
        batch is trained on exactly once, and `warmup_outputs` holds that step's outputs), then captures one step
        (capturing runs nothing). `pool` (torch.cuda.graph_pool_handle()) lets several graphs share memory."""
        flat, self._spec = tree_flatten(example_inputs)
        if not flat or not all(isinstance(t, torch.Tensor) and t.is_cuda for t in flat):
            raise ValueError("GraphedStep needs CUDA tensors as inputs (CUDA graphs exist only on a GPU)")
        # Kept for the graph's life: the captured kernels read, at fixed addresses, every tensor the step's closure
        # holds (loss weights, LR tensors, ...); dropping the step could free them while replays still read them.
        self._step = step
        if warmup < 1:
            raise ValueError("GraphedStep needs at least one warm-up step (optimizer state and lazy kernels)")
        self._static = [t.detach().clone() for t in flat]
        static_inputs = self._spec.unflatten(self._static)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                out = step(*static_inputs)
            # copies: the buffers the warm-up step returned may be reused by the capture below
            self.warmup_outputs = tree_map(
                lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, out)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a DataLoader's pin-memory thread, DALI's prefetch) during the
        # capture are allowed; a sync in this thread still fails the capture
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.outputs = step(*static_inputs)

    def __call__(self, *inputs):
        flat, spec = tree_flatten(inputs)
        if spec != self._spec:
            raise ValueError(f"GraphedStep: the inputs' structure {spec} differs from the captured one {self._spec}")
        for i, (dst, src) in enumerate(zip(self._static, flat)):
            if not isinstance(src, torch.Tensor) or src.device != dst.device:
                raise ValueError(f"GraphedStep: input {i} must be a tensor on {dst.device}, got "
                                 f"{getattr(src, 'device', type(src).__name__)}")
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(f"GraphedStep: input {i} has shape {tuple(src.shape)} {src.dtype}, the graph was "
                                 f"captured for {tuple(dst.shape)} {dst.dtype}; pad batches to the captured size")
            dst.copy_(src, non_blocking=True)
        self.graph.replay()
        return self.outputs
