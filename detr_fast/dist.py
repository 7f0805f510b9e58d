"""Distributed helpers: one process per device, started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the env).

Every helper is a no-op (or the trivial answer) when torch.distributed is not initialized, so the same code runs
in a single process. NCCL is used for CUDA devices, gloo for the CPU.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True inside an initialized process group."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_dist() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def env_world_size() -> int:
    """WORLD_SIZE from the environment (torchrun), 1 when absent."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_type: str, timeout_min: float = 30.0) -> tuple[int, int, int]:
    """Join the process group torchrun describes; returns (rank, world_size, local_rank).

    Does nothing (returns (0, 1, 0)) when WORLD_SIZE is absent or 1. On CUDA it selects the device LOCAL_RANK
    before creating the NCCL group.
    """
    world_size = env_world_size()
    if world_size <= 1:
        return 0, 1, 0
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not is_dist():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
            backend = "nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_min))
    return rank, world_size, local_rank


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum of `tensor` over all workers (no-op in a single process). Returns the tensor.

    No host-device sync: the collective is enqueued on the device stream (NCCL) or runs on the CPU tensor (gloo).
    """
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over all workers, as a new tensor (the input is left unchanged)."""
    if not is_dist():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / get_world_size()


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] in a single process. Picklable objects only."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src`, on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
