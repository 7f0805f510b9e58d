"""The engine trains and evaluates with data.pipeline=dali (DALI's CPU operators here, the GPU path where one is
present) on a small generated shapes set, through its default loader."""
import json
import math

import pytest

pytest.importorskip("nvidia.dali")

from helpers import cpu_and_cuda  # noqa: E402

from detr_fast.config import load_config  # noqa: E402
from detr_fast.engine import train  # noqa: E402


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_engine_trains_with_dali(tmp_path, device):
    sets = ["model.backbone=light", "model.light_channels=[8,16,16,32]", "model.hidden_dim=32", "model.nheads=4",
            "model.enc_layers=1", "model.dec_layers=2", "model.dim_feedforward=64", "model.num_queries=5",
            "model.num_classes=4", "model.dropout=0.0", "data.dataset=shapes", f"data.root={tmp_path / 'shapes'}",
            "data.pipeline=dali", "data.batch_size=4", "data.num_workers=1", "data.shapes_train=16",
            "data.shapes_val=6", "data.shapes_image_size=64", "data.scales=[56,64,72]", "data.max_size=96",
            "data.crop_resize=[48,56,64]", "data.crop_min=40", "data.crop_max=64", "data.val_size=64",
            "train.epochs=2", "train.eval_every=1", "train.lr=0.001", "train.lr_backbone=0.001", "train.log_every=2",
            "model.kernels=reference", "model.attention=reference", f"train.device={device}",
            f"train.output_dir={tmp_path / 'run'}"]
    result = train(load_config(None, sets))  # generates the shapes set, then trains on the DALI loader
    recs = [json.loads(s) for s in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [0, 1]
    assert all(r["steps"] == 4 and r["images"] == 16 and r["skipped"] == 0 for r in recs)
    assert all(math.isfinite(r["train_loss"]) for r in recs)
    assert set(result["eval"]) >= {"AP", "AP50"}
