"""Distributed: a 2-process gloo DDP step gives the gradients of one process on the same global batch; a 2-process
train() run shards the data, agrees on the evaluation and writes its files from rank 0 only."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp
from test_engine import FakeDetection, collate, fake_loader_fn, tiny_cfg

from detr_fast import dist
from detr_fast.engine import build_optimizer, train, train_step
from detr_fast.evaluation import STAT_NAMES, autocast_context


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch():
    # halves with 4 and 2 targets (one image without any): the box losses depend on num_boxes being averaged over
    # the workers. The class loss is a weighted mean per rank, which averages to the global weighted mean only
    # when every rank has the same weight sum, so these runs use eos_coef = 1 (DDP_SETS)
    return collate(FakeDetection(4, seed=11, num_targets=[3, 1, 2, 0]).items)


DDP_SETS = ("loss.eos_coef=1.0",)


def _step_grads(model, cfg, batch) -> dict:
    """One engine step; returns {name: grad} of the plain module."""
    from detr_fast.criterion import build_criterion

    criterion = build_criterion(cfg)
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    optimizer, _ = build_optimizer(inner, cfg, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    _, _, row = train_step(model, criterion, batch, optimizer, amp_ctx=autocast_context(torch.device("cpu"), "none"),
                           scaler=scaler, clip_max_norm=cfg.train.clip_max_norm)
    grads = {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}
    grads["__loss__"] = row[0].clone()
    return grads


def _model(cfg):
    from detr_fast.models import build_detr

    torch.manual_seed(0)
    model = build_detr(cfg)
    # the light trunk trains BatchNorm, whose batch statistics are per process under DDP (no SyncBatchNorm on the
    # CPU); with running statistics the function no longer depends on how the batch is split
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    return model


def _worker(rank, world, port, out_dir):
    """Both distributed checks in one pair of processes (each start costs seconds): one DDP step, then train()."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        assert dist.init_distributed("cpu") == (rank, world, rank)
        assert dist.get_world_size() == world and dist.is_main_process() == (rank == 0)
        # 1. one step of DDP on this rank's half of the global batch
        cfg = tiny_cfg(out_dir, *DDP_SETS)
        model = torch.nn.parallel.DistributedDataParallel(_model(cfg))
        full = _global_batch()
        half = full.images.shape[0] // world
        sl = slice(rank * half, (rank + 1) * half)
        part = type(full)(full.images[sl], full.mask[sl], {k: v[sl] for k, v in full.targets.items()},
                          full.image_ids[sl], full.orig_sizes[sl], full.sizes[sl])
        torch.save(_step_grads(model, cfg, part), os.path.join(out_dir, f"grads{rank}.pt"))
        # 2. a whole training run (the engine finds the process group already initialized)
        cfg = tiny_cfg(os.path.join(out_dir, "run"), "train.epochs=2", "train.eval_every=1")
        result = train(cfg, loader_fn=fake_loader_fn(n_train=16, n_val=6))
        with open(os.path.join(out_dir, f"result{rank}.json"), "w") as f:
            json.dump({"world": dist.get_world_size(), "eval": result["eval"], "epochs": result["epochs"]}, f)
    finally:
        dist.cleanup()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return out


def test_ddp_gradients_equal_single_process(two_process_run):
    tmp_path = two_process_run
    torch.set_num_threads(1)
    cfg = tiny_cfg(tmp_path, *DDP_SETS)
    single = _step_grads(_model(cfg), cfg, _global_batch())
    g0 = torch.load(tmp_path / "grads0.pt")
    g1 = torch.load(tmp_path / "grads1.pt")
    assert g0.keys() == single.keys() and len(single) > 20
    for name, g in single.items():
        if name == "__loss__":
            continue
        assert torch.equal(g0[name], g1[name]), name  # DDP leaves identical gradients on every rank
        torch.testing.assert_close(g0[name], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # the per-rank losses differ (each its own half) but their mean is the single-process loss
    torch.testing.assert_close((g0["__loss__"] + g1["__loss__"]) / 2, single["__loss__"], rtol=1e-5, atol=1e-6)
    assert any(g.abs().max() > 1e-4 for n, g in single.items() if n.startswith("backbone."))


def test_two_process_training_run(two_process_run):
    tmp_path = two_process_run
    r0 = json.loads((tmp_path / "result0.json").read_text())
    r1 = json.loads((tmp_path / "result1.json").read_text())
    assert r0["world"] == r1["world"] == 2
    assert set(r0["eval"]) == set(STAT_NAMES) and r0["eval"] == r1["eval"]  # rank 0's numbers on every rank
    # 16 images over 2 ranks at batch 4: 2 steps per rank, 16 images per epoch in all
    assert [(e["steps"], e["images"]) for e in r0["epochs"]] == [(2, 16), (2, 16)]
    assert r0["epochs"][1]["train_loss"] == r1["epochs"][1]["train_loss"]  # all-reduced epoch means
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pth", "curves.png", "eval_epoch000.json",
                                                     "eval_epoch001.json", "log.jsonl"]
    lines = (run / "log.jsonl").read_text().splitlines()
    assert len(lines) == 2  # rank 0 alone wrote it
    from detr_fast.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run / "checkpoint.pth")
    assert len(ckpt["rng"]) == 2  # each rank's RNG states, for an exact resume
    assert not any(k.startswith("module.") for k in ckpt["model"])


def test_helpers_in_a_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist.init_distributed("cpu") == (0, 1, 0)
    assert not dist.is_dist() and dist.get_world_size() == 1 and dist.get_rank() == 0 and dist.is_main_process()
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce_sum_(t) is t and t.tolist() == [1.0, 2.0]
    assert dist.all_reduce_mean(t).tolist() == [1.0, 2.0]
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist.broadcast_object(5) == 5
    dist.barrier()
