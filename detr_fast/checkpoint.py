"""Checkpoints: atomic save, load for resume, and `load_pretrained` for official DETR or detr_fast weights.

A training checkpoint (output_dir/checkpoint.pth) is a dict:
    model, optimizer, lr_scheduler, scaler (fp16 only), epoch (last finished, 0-based), loader_epoch (the next
    epoch the data loader shuffles for), config (Config.to_dict()), rng (one entry per rank: python, numpy,
    torch CPU and CUDA generator states), version.
Everything in it is loadable with `torch.load(weights_only=True)`: the numpy RNG state is stored as a tensor.
"""
from __future__ import annotations

import argparse
import os
import pickle
import random
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose weights do not fit the model."""


# --------------------------------------------------------------------------------------------------- save / load

def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the destination's folder, fsync, then os.replace: a reader (or a crash
    mid-write) never sees a partial file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_file(path: str | os.PathLike, map_location="cpu") -> dict:
    """torch.load with weights_only=True (argparse.Namespace allowed, as in official DETR checkpoints).

    A missing file raises FileNotFoundError; an unreadable, truncated or corrupt one raises CheckpointError;
    both name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError,
            AttributeError, IndexError, KeyError, TypeError) as exc:
        size = path.stat().st_size
        raise CheckpointError(f"checkpoint file {path} ({size} bytes) is corrupt, truncated or not a torch "
                              f"checkpoint: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                              ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint file {path} holds a {type(obj).__name__}, expected a dict")
    return obj


# ----------------------------------------------------------------------------------------------------- RNG state

def rng_state() -> dict:
    """This process's RNG states: python, numpy (as tensors, for weights_only loading), torch CPU and CUDA."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]  # CPU tensors saved by rng_state(): no device involved
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            warnings.warn("checkpoint CUDA RNG states are for a different number of devices; not restored",
                          stacklevel=2)


# ------------------------------------------------------------------------------------------------ training state

def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(path, *, model: nn.Module, optimizer, lr_scheduler, epoch: int, config: dict,
                    rng: list[dict], scaler=None, extra: dict | None = None) -> None:
    """Write a training checkpoint atomically (see the module docstring for its layout)."""
    ckpt = {
        "version": CHECKPOINT_VERSION,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "epoch": epoch,
        "loader_epoch": epoch + 1,
        "config": config,
        "rng": rng,
    }
    if scaler is not None and scaler.is_enabled():
        ckpt["scaler"] = scaler.state_dict()
    if extra:
        ckpt.update(extra)
    atomic_save(ckpt, path)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a training checkpoint written by save_checkpoint; checks that it holds what resuming needs."""
    ckpt = load_file(path, map_location)
    missing = [k for k in ("model", "optimizer", "lr_scheduler", "epoch") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a detr_fast training checkpoint (missing {', '.join(missing)}); "
                              "use train.pretrained to start from model weights only")
    return ckpt


# ---------------------------------------------------------------------------------------------- load_pretrained

def _extract_state_dict(obj: dict, path) -> dict:
    state = obj.get("model", obj)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict or a dict with a 'model' state dict")
    # weights saved from a DistributedDataParallel wrapper
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _class_head_keys(keys) -> set[str]:
    return {k for k in keys if k.split(".")[0] == "class_embed"}


def load_pretrained(model: nn.Module, path, log=print) -> dict:
    """Load model weights from an official DETR `{'model': state_dict}` file or a detr_fast checkpoint.

    Matching is strict: every key of the model must be in the file with the same shape and the file may hold no
    other key; otherwise CheckpointError lists the missing keys, unexpected keys and shape mismatches. One
    exception, for fine-tuning on another number of classes: when the only differences are the shapes of the
    class head (class_embed.*), the class head is re-initialized, a line says so, and everything else is loaded.
    Returns {"reinitialized": [keys left at their fresh initialization]}.
    """
    target = unwrap(model)
    state = _extract_state_dict(load_file(path, "cpu"), path)
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    reinit: list[str] = []
    class_keys = _class_head_keys(own)
    if not missing and not unexpected and mismatched and set(mismatched) <= class_keys:
        old_classes = state["class_embed.weight"].shape[0] if "class_embed.weight" in state else "?"
        new_classes = own["class_embed.weight"].shape[0] if "class_embed.weight" in own else "?"
        msg = (f"load_pretrained: {path}: class head has {old_classes} outputs, the model {new_classes}; "
               f"re-initializing {', '.join(sorted(class_keys))} and loading the rest")
        warnings.warn(msg, stacklevel=2)
        if log is not None:
            log(msg)
        state = {k: v for k, v in state.items() if k not in class_keys}
        head = target.class_embed
        if hasattr(head, "reset_parameters"):
            head.reset_parameters()
        reinit = sorted(class_keys)
        result = target.load_state_dict(state, strict=False)
        if sorted(result.missing_keys) != reinit or result.unexpected_keys:  # cannot happen after the checks above
            raise CheckpointError(f"{path}: partial load left {result.missing_keys} / {result.unexpected_keys}")
        return {"reinitialized": reinit}
    if missing or unexpected or mismatched:
        lines = [f"{path} does not match the model (strict loading):"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): " + ", ".join(
                f"{k} file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched))
        raise CheckpointError("\n".join(lines))
    target.load_state_dict(state, strict=True)
    return {"reinitialized": reinit}
