"""CLI: info, validate (passing and failing), bad overrides, make-shapes, and train + eval end to end on a tiny
generated shapes set through the real data pipeline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detr_fast.cli import main
from detr_fast.evaluation import STAT_NAMES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_python_m_info_runs():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "detr_fast", "info"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"torch {torch.__version__}" in out
    assert "CUDA available: " in out and "CUDA kernels compiled: " in out
    for op in ("matching_cost", "box_loss", "linear_assignment", "attention"):
        line = next(ln for ln in out.splitlines() if ln.startswith(op))
        assert "reference" in line


def test_validate_passes_on_cpu(capsys):
    assert main(["validate"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "0 failed" in out


def test_validate_fails_with_nonzero_exit_on_a_failing_case(capsys):
    from detr_fast.ops import registry

    def make(device, dtype, gen):
        return (torch.rand(5, 4, generator=gen, dtype=dtype).to(device),) * 2, {}

    def check(out, args, kwargs, dtype):
        return 1.0, 1e-6  # an error above its tolerance

    registry.cases()  # load the registered cases first
    bad = registry.register(registry.Case(op="box_loss", name="always wrong", make=make, check=check))
    try:
        assert main(["validate", "--ops", "box_loss"]) == 1
    finally:
        registry._CASES.remove(bad)
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if "always wrong" in ln)
    assert "FAIL" in row and "float32" in row
    assert "1 failed" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_validate_on_missing_cuda_is_a_clear_error():
    with pytest.raises(SystemExit, match="no CUDA device"):
        main(["validate", "--device", "cuda"])


def test_unknown_override_key_fails_clearly(capsys, tmp_path):
    rc = main(["train", "--config", str(ROOT / "configs" / "shapes.yaml"), "--set", "train.epoch=3",
               "--set", f"train.output_dir={tmp_path}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.epoch'" in err and "epochs" in err  # names the bad key and lists the known ones
    assert main(["train", "--config", str(ROOT / "configs" / "shapes.yaml"), "--set", "train.epochs=three"]) == 2
    assert "expected an integer" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: an unknown subcommand
        main(["trian"])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "shapes"
    assert main(["make-shapes", "--out", str(data), "--train", "16", "--val", "8", "--size", "64",
                 "--seed", "1"]) == 0
    return data


def _train_args(data, out, *extra):
    sets = ["model.light_stem=conv", "model.light_channels=[8,16,16,32]", "model.hidden_dim=32", "model.nheads=4",
            "model.enc_layers=1", "model.dec_layers=2", "model.dim_feedforward=64", "model.num_queries=6",
            "data.batch_size=4", "data.num_workers=0", f"data.root={data}", "data.shapes_train=16", "data.shapes_val=8",
            "data.shapes_image_size=64", "data.shapes_seed=1", "data.scales=[56,64]", "data.max_size=80",
            "data.crop_resize=[48,56]", "data.crop_min=40", "data.crop_max=64", "data.val_size=64",
            "train.device=cpu", "train.log_every=2", f"train.output_dir={out}", *extra]
    args = ["train", "--config", str(ROOT / "configs" / "shapes.yaml")]
    for s in sets:
        args += ["--set", s]
    return args


def test_make_shapes_train_and_eval_end_to_end(shapes, tmp_path, capsys):
    data = shapes
    assert (data / "annotations" / "instances_train.json").is_file()
    assert len(json.loads((data / "annotations" / "instances_val.json").read_text())["images"]) == 8
    out = tmp_path / "run"
    assert main(_train_args(data, out, "train.epochs=2", "train.eval_every=1")) == 0
    printed = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]" in printed  # the final table
    lines = [json.loads(s) for s in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1] and lines[0]["images"] == 16 and lines[0]["steps"] == 4
    assert (out / "curves.png").is_file()
    # eval with the config stored in the checkpoint, writing to an explicit file
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pth"), "--output", str(tmp_path / "e.json")]) == 0
    stats = json.loads((tmp_path / "e.json").read_text())
    assert set(stats) == set(STAT_NAMES)
    assert stats == json.loads((out / "eval_epoch001.json").read_text())  # same weights, same numbers
    # a corrupt checkpoint: exit code 2 and the file named
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\0" * 100)
    assert main(["eval", "--config", str(ROOT / "configs" / "shapes.yaml"), "--checkpoint", str(bad)]) == 2
    assert "bad.pth" in capsys.readouterr().err


def test_resume_equals_uninterrupted_with_the_shapes_pipeline(shapes, tmp_path):
    """The real data pipeline (random flips, resizes and crops) with dropout on: 2 epochs in one run equal
    1 epoch + a resumed second epoch, losses and weights bit for bit."""
    from detr_fast.checkpoint import load_checkpoint

    # the step schedule: a cosine one spans train.epochs, which differs between the 1- and the 2-epoch runs
    common = ("model.dropout=0.1", "train.eval_every=5", "train.lr_schedule=step")
    assert main(_train_args(shapes, tmp_path / "full", "train.epochs=2", *common)) == 0
    assert main(_train_args(shapes, tmp_path / "part", "train.epochs=1", *common)) == 0
    ckpt = tmp_path / "part" / "checkpoint.pth"
    assert main(_train_args(shapes, tmp_path / "part", "train.epochs=2", f"train.resume={ckpt}", *common)) == 0
    full = [json.loads(s) for s in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    part = [json.loads(s) for s in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in part] == [0, 1]
    assert full[1]["train_loss"] == part[1]["train_loss"] and full[1]["train_loss_ce_0"] == part[1]["train_loss_ce_0"]
    assert full[0]["train_loss"] != full[1]["train_loss"]
    wa = load_checkpoint(tmp_path / "full" / "checkpoint.pth")["model"]
    wb = load_checkpoint(ckpt)["model"]
    assert all(torch.equal(v, wb[k]) for k, v in wa.items())
