"""Checkpoints: atomic writes, clear errors for corrupt files, strict load_pretrained with its class-head exception,
RNG state round trip."""
from __future__ import annotations

import argparse
import os
import random

import numpy as np
import pytest
import torch

from detr_fast import checkpoint as ck
from detr_fast.checkpoint import CheckpointError, atomic_save, load_checkpoint, load_file, load_pretrained
from detr_fast.config import load_config
from detr_fast.models import build_detr


def small_cfg(*extra):
    sets = ["model.backbone=light", "model.light_channels=[8,16,16,32]", "model.hidden_dim=32", "model.nheads=4",
            "model.enc_layers=1", "model.dec_layers=2", "model.dim_feedforward=64", "model.num_queries=5",
            "model.num_classes=5", "model.dropout=0.0"]
    return load_config(None, sets + list(extra))


def _model(seed, *extra):
    torch.manual_seed(seed)
    return build_detr(small_cfg(*extra)).eval()


def _inputs():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 40, 48, generator=g)
    mask = torch.zeros(2, 40, 48, dtype=torch.bool)
    mask[1, 30:] = True
    return images, mask


# ---------------------------------------------------------------------------------------------- atomic / errors

def test_atomic_save_replaces_whole_file_and_leaves_old_one_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "checkpoint.pth"
    atomic_save({"a": torch.arange(3)}, path)
    assert torch.equal(load_file(path)["a"], torch.arange(3))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    atomic_save({"a": torch.arange(5)}, path)
    assert torch.equal(load_file(path)["a"], torch.arange(5))

    real_save = torch.save

    def crash(obj, f, *a, **k):  # writes some bytes, then dies mid-write
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt("killed while writing")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"a": torch.arange(7)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(load_file(path)["a"], torch.arange(5))  # the previous checkpoint is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pth"]  # no temp file left behind


def test_corrupt_truncated_and_missing_files_name_the_file(tmp_path):
    good = tmp_path / "good.pth"
    atomic_save({"model": _model(0).state_dict()}, good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    for bad in (truncated, garbage, empty):
        with pytest.raises(CheckpointError, match=bad.name):
            load_file(bad)
        with pytest.raises(CheckpointError, match="corrupt"):
            load_pretrained(_model(0), bad)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_file(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="not a detr_fast training checkpoint"):
        load_checkpoint(good)  # model weights only: cannot resume from it


# --------------------------------------------------------------------------------------------- load_pretrained

def test_load_pretrained_official_format_gives_identical_outputs(tmp_path):
    src, dst = _model(1), _model(2)
    images, mask = _inputs()
    path = tmp_path / "official.pth"
    # the official files hold {'model': state_dict} (training ones also argparse args)
    torch.save({"model": src.state_dict(), "args": argparse.Namespace(lr=1e-4)}, path)
    assert not torch.allclose(dst(images, mask)["pred_boxes"], src(images, mask)["pred_boxes"])
    info = load_pretrained(dst, path, log=None)
    assert info == {"reinitialized": []}
    torch.testing.assert_close(dst(images, mask)["pred_logits"], src(images, mask)["pred_logits"], rtol=0, atol=0)
    # a state dict saved from a DistributedDataParallel wrapper ('module.' prefix) loads too
    path2 = tmp_path / "ddp.pth"
    torch.save({"model": {"module." + k: v for k, v in _model(3).state_dict().items()}}, path2)
    load_pretrained(dst, path2, log=None)
    for k, v in _model(3).state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_load_pretrained_strict_error_lists_missing_unexpected_and_shapes(tmp_path):
    state = _model(1).state_dict()
    state.pop("query_embed.weight")
    state.pop("transformer.encoder.layers.0.linear1.bias")
    state["extra.head.weight"] = torch.zeros(3)
    state["bbox_embed.layers.0.weight"] = torch.zeros(7, 32)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    model = _model(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as exc:
        load_pretrained(model, path)
    msg = str(exc.value)
    assert "bad.pth" in msg
    assert "missing keys (2): query_embed.weight, transformer.encoder.layers.0.linear1.bias" in msg
    assert "unexpected keys (1): extra.head.weight" in msg
    assert "bbox_embed.layers.0.weight file (7, 32) vs model (32, 32)" in msg
    for k, v in model.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k]), k


def test_load_pretrained_reinitializes_class_head_for_other_class_count(tmp_path, capsys):
    src = _model(1)  # 5 classes -> class_embed [6, 32]
    path = tmp_path / "five_classes.pth"
    torch.save({"model": src.state_dict()}, path)
    dst = _model(2, "model.num_classes=2")  # class_embed [3, 32]
    with pytest.warns(UserWarning, match="re-initializing class_embed"):
        info = load_pretrained(dst, path)
    assert info["reinitialized"] == ["class_embed.bias", "class_embed.weight"]
    assert "class head has 6 outputs, the model 3" in capsys.readouterr().out
    sd = dst.state_dict()
    assert sd["class_embed.weight"].shape == (3, 32)
    assert torch.isfinite(sd["class_embed.weight"]).all() and sd["class_embed.weight"].abs().sum() > 0
    for k, v in src.state_dict().items():
        if not k.startswith("class_embed."):
            assert torch.equal(sd[k], v), k
    # a class-head mismatch together with another difference is an error, not a re-initialization
    state = src.state_dict()
    state.pop("query_embed.weight")
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_pretrained(_model(2, "model.num_classes=2"), path)


# -------------------------------------------------------------------------------------------------------- RNG

def test_rng_state_round_trip_through_a_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian behind
    state = ck.rng_state()
    atomic_save({"rng": [state]}, tmp_path / "r.pth")
    draws = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    ck.set_rng_state(load_file(tmp_path / "r.pth")["rng"][0])
    assert (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist()) == draws
