"""Training loop: the loss falls on a tiny problem, resume equals the uninterrupted run, logs/checkpoints/evaluation
files are written, postprocess and COCO stats are right on hand-made cases."""
from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass

import pytest
import torch

from detr_fast.checkpoint import load_checkpoint
from detr_fast.config import load_config
from detr_fast.engine import ProgressBar, train
from detr_fast.evaluation import STAT_NAMES, coco_stats, postprocess, to_coco_results, xyxy_to_xywh


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (several threads spin against each other on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------ a tiny fake dataset

@dataclass
class FakeBatch:
    images: torch.Tensor  # [B, 3, H, W]
    mask: torch.Tensor  # [B, H, W]
    targets: dict
    image_ids: torch.Tensor  # [B]
    orig_sizes: torch.Tensor  # [B, 2]
    sizes: torch.Tensor  # [B, 2]
    skipped: int = 0

    def to(self, device, non_blocking=True):
        f = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return FakeBatch(f(self.images), f(self.mask), {k: f(v) for k, v in self.targets.items()},
                         f(self.image_ids), f(self.orig_sizes), f(self.sizes), self.skipped)


class FakeDetection:
    """n images of 1-2 colored squares (class 0 red, class 1 green) on a dark background; every other image is
    24 px high instead of 32 so batches are padded. `.coco` is the pycocotools ground truth."""

    def __init__(self, n: int, seed: int, num_targets: list[int] | None = None):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        images, anns = [], []
        for i in range(n):
            h, w = (32, 32) if i % 2 == 0 else (24, 32)
            img = torch.full((3, h, w), -1.0) + 0.1 * torch.randn(3, h, w, generator=g)
            k = num_targets[i] if num_targets else 1 + int(torch.randint(0, 2, (1,), generator=g))
            labels, boxes = [], []
            for _ in range(k):
                lab = int(torch.randint(0, 2, (1,), generator=g))
                s = int(torch.randint(6, 12, (1,), generator=g))
                x0 = int(torch.randint(0, w - s, (1,), generator=g))
                y0 = int(torch.randint(0, h - s, (1,), generator=g))
                img[lab, y0:y0 + s, x0:x0 + s] = 1.5
                labels.append(lab)
                boxes.append([(x0 + s / 2) / w, (y0 + s / 2) / h, s / w, s / h])
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": lab, "bbox": [x0, y0, s, s],
                             "area": s * s, "iscrowd": 0})
            images.append({"id": i + 1, "height": h, "width": w, "file_name": f"{i}.jpg"})
            self.items.append((img, torch.tensor(labels, dtype=torch.int64),
                               torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), i + 1, (h, w)))
        self._coco_dataset = {"images": images, "annotations": anns,
                              "categories": [{"id": 0, "name": "red"}, {"id": 1, "name": "green"}]}
        self._coco = None

    @property
    def coco(self):
        """The pycocotools ground truth, built on first use (only the evaluation needs pycocotools)."""
        if self._coco is None:
            from pycocotools.coco import COCO

            self._coco = COCO()
            self._coco.dataset = self._coco_dataset
            with contextlib.redirect_stdout(io.StringIO()):
                self._coco.createIndex()
        return self._coco

    def __len__(self):
        return len(self.items)


def collate(items) -> FakeBatch:
    B = len(items)
    H = max(it[0].shape[1] for it in items)
    W = max(it[0].shape[2] for it in items)
    T = max(len(it[1]) for it in items)
    images = torch.zeros(B, 3, H, W)
    mask = torch.ones(B, H, W, dtype=torch.bool)
    labels = torch.zeros(B, T, dtype=torch.int64)
    boxes = torch.zeros(B, T, 4)
    nt = torch.zeros(B, dtype=torch.int64)
    for b, (img, lab, box, _, _) in enumerate(items):
        h, w = img.shape[1:]
        images[b, :, :h, :w] = img
        mask[b, :h, :w] = False
        labels[b, :len(lab)] = lab
        boxes[b, :len(lab)] = box
        nt[b] = len(lab)
    ids = torch.tensor([it[3] for it in items])
    sizes = torch.tensor([it[4] for it in items])
    return FakeBatch(images, mask, {"labels": labels, "boxes": boxes, "num_targets": nt}, ids, sizes, sizes)


class FakeLoader:
    """Batches of a FakeDetection; the train order is a permutation drawn from (seed, epoch) (set_epoch), the
    shard of rank r is every world-th index, as DistributedSampler does."""

    def __init__(self, dataset, batch_size, shuffle, seed=0, rank=0, world_size=1):
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.rank, self.world = rank, world_size
        self.epoch = 0
        self.sampler = self

    def set_epoch(self, epoch):
        self.epoch = epoch

    def indices(self):
        n = len(self.dataset)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist() \
            if self.shuffle else list(range(n))
        return order[self.rank::self.world]

    def __len__(self):
        return math.ceil(len(self.indices()) / self.batch_size)

    def __iter__(self):
        idx = self.indices()
        for s in range(0, len(idx), self.batch_size):
            yield collate([self.dataset.items[i] for i in idx[s:s + self.batch_size]])


def fake_loader_fn(n_train=16, n_val=8):
    datasets = {"train": FakeDetection(n_train, seed=1), "val": FakeDetection(n_val, seed=2)}

    def loader_fn(cfg, split, distributed=False, rank=0, world_size=1):
        return FakeLoader(datasets[split], cfg.data.batch_size, shuffle=split == "train", seed=cfg.train.seed,
                          rank=rank, world_size=world_size)
    return loader_fn


def tiny_cfg(tmp_path, *extra):
    sets = ["model.backbone=light", "model.light_channels=[8,16,16,32]", "model.hidden_dim=32", "model.nheads=4",
            "model.enc_layers=1", "model.dec_layers=2", "model.dim_feedforward=64", "model.num_queries=5",
            "model.num_classes=2", "model.dropout=0.0", "data.batch_size=4", "data.num_workers=0",
            "train.lr=0.001", "train.lr_backbone=0.001", "train.device=cpu", "train.log_every=2", "train.seed=3",
            f"train.output_dir={tmp_path}"]
    return load_config(None, sets + list(extra))


# ----------------------------------------------------------------------------------------------------- training

def test_short_training_run_loss_falls_and_writes_its_files(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", "train.epochs=6", "train.eval_every=2", "train.lr=0.002")
    result = train(cfg, loader_fn=fake_loader_fn(n_train=48))
    recs = result["epochs"]
    assert [r["epoch"] for r in recs] == [0, 1, 2, 3, 4, 5]
    losses = [r["train_loss"] for r in recs]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    out = tmp_path / "run"
    lines = [json.loads(s) for s in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1, 2, 3, 4, 5]
    assert lines[0]["steps"] == 12 and lines[0]["images"] == 48 and lines[0]["skipped"] == 0
    for key in ("train_loss_ce", "train_loss_bbox", "train_loss_giou", "train_loss_ce_0", "lr", "lr_backbone",
                "img_per_s"):
        assert key in lines[0], key
    # evaluated at epochs 1, 3, 5 (eval_every=2; the last is always evaluated)
    assert [r["epoch"] for r in lines if "AP" in r] == [1, 3, 5]
    for e in (1, 3, 5):
        stats = json.loads((out / f"eval_epoch{e:03d}.json").read_text())
        assert set(stats) == set(STAT_NAMES)
        assert all(-1.0 <= v <= 1.0 for v in stats.values())
    assert result["eval"] == json.loads((out / "eval_epoch005.json").read_text())
    assert (out / "curves.png").stat().st_size > 1000
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["epoch"] == 5 and ckpt["loader_epoch"] == 6
    assert ckpt["config"]["train"]["epochs"] == 6
    assert len(ckpt["rng"]) == 1 and {"python", "numpy", "torch"} <= set(ckpt["rng"][0])
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_resume_equals_uninterrupted(tmp_path):
    """2 epochs in one go == 1 epoch, then resume for the second: same losses, same weights, bit for bit.
    Dropout is on, so the RNG states must be restored; eval_every=2 evaluates the 1-epoch run (last epoch) but
    not the 2-epoch run's first epoch, so evaluation must not consume the training RNG."""
    common = ("model.dropout=0.1", "train.eval_every=2", "train.lr_drop=1", "train.warmup_steps=6")
    full = train(tiny_cfg(tmp_path / "full", "train.epochs=2", *common), loader_fn=fake_loader_fn())
    first = train(tiny_cfg(tmp_path / "part", "train.epochs=1", *common), loader_fn=fake_loader_fn())
    assert first["epochs"][0]["train_loss"] == full["epochs"][0]["train_loss"]
    resumed = train(tiny_cfg(tmp_path / "part", "train.epochs=2", *common,
                             f"train.resume={tmp_path / 'part' / 'checkpoint.pth'}"), loader_fn=fake_loader_fn())
    assert [r["epoch"] for r in resumed["epochs"]] == [1]
    a, b = full["epochs"][1], resumed["epochs"][0]
    for key in a:
        if key.startswith("train_loss") or key in ("lr", "lr_backbone", "AP", "AP50"):
            assert a[key] == b[key], key
    # 4 steps per epoch: epoch 1 starts at step 4, still warming up (5/6), after the 10x drop of epoch 1
    assert a["lr"] == pytest.approx(1e-3 * 0.1 * 5 / 6)
    wa = load_checkpoint(tmp_path / "full" / "checkpoint.pth")
    wb = load_checkpoint(tmp_path / "part" / "checkpoint.pth")
    for k, v in wa["model"].items():
        assert torch.equal(v, wb["model"][k]), k
    sa, sb = wa["optimizer"]["state"], wb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"])
    # the resumed log continues the one of the first part
    lines = [json.loads(s) for s in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1]


def test_lr_schedule_warmup_step_and_cosine():
    """lr_factor by hand: linear warm-up, the 10x step at lr_drop (in fractional epochs), cosine end points."""
    from detr_fast.engine import lr_factor

    cfg = load_config(None, ["train.epochs=10", "train.lr_drop=4", "train.warmup_steps=5"])
    spe = 7  # steps per epoch
    assert [lr_factor(s, cfg, spe) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lr_factor(4 * spe - 1, cfg, spe) == 1.0 and lr_factor(4 * spe, cfg, spe) == pytest.approx(0.1)
    cos = load_config(None, ["train.epochs=10", "train.lr_schedule=cosine", "train.lr_min_factor=0.05"])
    assert lr_factor(0, cos, spe) == 1.0
    assert lr_factor(5 * spe, cos, spe) == pytest.approx(0.05 + 0.95 * 0.5)
    assert lr_factor(10 * spe, cos, spe) == pytest.approx(0.05)
    assert lr_factor(50 * spe, cos, spe) == pytest.approx(0.05)  # past the end it stays at the floor
    values = [lr_factor(s, cos, spe) for s in range(10 * spe)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # never rises without warm-up


def test_lr_scheduler_steps_every_optimizer_step(tmp_path):
    """The engine steps the schedule per optimizer step: with cosine over 2 epochs the LR logged at the start of
    epoch 1 is the factor after exactly one epoch of steps."""
    from detr_fast.engine import lr_factor

    cfg = tiny_cfg(tmp_path, "train.epochs=2", "train.eval_every=0", "train.lr_schedule=cosine",
                   "train.lr_min_factor=0.0", "train.warmup_steps=2")
    recs = train(cfg, loader_fn=fake_loader_fn())["epochs"]
    assert recs[0]["lr"] == pytest.approx(1e-3 * 0.5)  # first step, warm-up 1/2
    assert recs[1]["lr"] == pytest.approx(1e-3 * lr_factor(4, cfg, 4)) == pytest.approx(1e-3 * 0.5)


def test_time_limit_stops_before_an_epoch_that_would_cross_it_and_still_evaluates(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.epochs=50", "train.eval_every=0", "train.time_limit_min=0.000001",
                   "train.max_steps_per_epoch=2")
    result = train(cfg, loader_fn=fake_loader_fn())
    assert [r["epoch"] for r in result["epochs"]] == [0]
    assert result["epochs"][0]["steps"] == 2
    assert set(result["eval"]) == set(STAT_NAMES)
    roomy = tiny_cfg(tmp_path / "roomy", "train.epochs=3", "train.eval_every=0", "train.time_limit_min=60",
                     "train.max_steps_per_epoch=1")
    assert [r["epoch"] for r in train(roomy, loader_fn=fake_loader_fn())["epochs"]] == [0, 1, 2]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_runs_on_cpu(tmp_path, amp):
    cfg = tiny_cfg(tmp_path, f"train.amp={amp}", "train.epochs=1", "train.max_steps_per_epoch=3")
    result = train(cfg, loader_fn=fake_loader_fn())
    assert result["epochs"][0]["steps"] == 3 and math.isfinite(result["epochs"][0]["train_loss"])
    assert ("scaler" in load_checkpoint(tmp_path / "checkpoint.pth")) == (amp == "fp16")


FAST_OPTIONS = ("model.attention=fused", "model.flat_cast=true", "model.packed_proj=true", "model.fused_norm=true",
                "model.fused_ffn=true")


def test_training_with_every_fast_option_on_cpu(tmp_path):
    """The engine with the fused attention core, the one-pass weight cast, the packed projections and the fused
    norm under bf16: the same losses as without them (to bf16 rounding over a few steps), and a resume from its
    checkpoint continues."""
    common = ("train.amp=bf16", "train.epochs=2", "train.max_steps_per_epoch=3", "train.eval_every=0",
              "model.attention=fused")
    plain = train(tiny_cfg(tmp_path / "plain", *common), loader_fn=fake_loader_fn())["epochs"]
    fast = train(tiny_cfg(tmp_path / "fast", *common, *FAST_OPTIONS), loader_fn=fake_loader_fn())["epochs"]
    for a, b in zip(plain, fast):
        assert math.isfinite(b["train_loss"]) and b["train_loss"] == pytest.approx(a["train_loss"], rel=3e-3)
    more = tiny_cfg(tmp_path / "fast", *common, *FAST_OPTIONS, "train.epochs=3",
                    f"train.resume={tmp_path / 'fast' / 'checkpoint.pth'}")
    assert [r["epoch"] for r in train(more, loader_fn=fake_loader_fn())["epochs"]] == [2]


def test_nonfinite_loss_stops_with_a_clear_error(tmp_path):
    from detr_fast.criterion import build_criterion

    class NaNAfter(torch.nn.Module):
        """The real criterion, whose loss_bbox turns NaN from the third call on."""

        def __init__(self, cfg):
            super().__init__()
            self.inner = build_criterion(cfg)
            self.weight_dict = self.inner.weight_dict
            self.calls = 0

        def forward(self, out, targets):
            self.calls += 1
            losses = self.inner(out, targets)
            if self.calls >= 3:
                losses["loss_bbox"] = losses["loss_bbox"] * float("nan")
            return losses

    cfg = tiny_cfg(tmp_path, "train.epochs=1", "train.log_every=1")
    with pytest.raises(FloatingPointError, match="step 3: loss is nan"):
        train(cfg, loader_fn=fake_loader_fn(), criterion_fn=NaNAfter)
    assert not (tmp_path / "checkpoint.pth").exists()


# -------------------------------------------------------------------------------------------------- evaluation

def test_postprocess_hand_computed():
    logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 3.0, 5.0]]])  # [1, 2, C+1=3]
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])  # [1, 2, 4] cxcywh
    orig = torch.tensor([[100, 200]])  # h=100, w=200
    scores, labels, xyxy = postprocess(logits, boxes, orig)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(scores, torch.stack((p[0, 0, 0], p[0, 1, 1]))[None])
    assert labels.tolist() == [[0, 1]]  # the no-object column (index 2) never wins, even when it is the largest
    torch.testing.assert_close(xyxy, torch.tensor([[[80.0, 30.0, 120.0, 70.0], [0.0, 50.0, 100.0, 100.0]]]))
    torch.testing.assert_close(xyxy_to_xywh(xyxy), torch.tensor([[[80.0, 30.0, 40.0, 40.0], [0., 50., 100., 50.]]]))


def test_coco_stats_perfect_missing_and_duplicates():
    ds = FakeDetection(4, seed=5)
    gt = []
    for img, lab, box, img_id, (h, w) in ds.items:
        cx, cy, bw, bh = box.unbind(-1)
        xyxy = torch.stack(((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h), -1)
        gt.append((img_id, lab, xyxy))
    # perfect detections (one per target), given twice for image 1 as a padded distributed shard would
    ids = torch.tensor([g[0] for g in gt] + [gt[0][0]])
    T = max(len(g[1]) for g in gt)
    scores = torch.zeros(len(ids), T)
    labels = torch.zeros(len(ids), T, dtype=torch.int64)
    boxes = torch.zeros(len(ids), T, 4)
    for i, g in enumerate(gt + [gt[0]]):
        n = len(g[1])
        scores[i, :n] = 0.9
        labels[i, :n] = g[1]
        boxes[i, :n] = g[2]
    res = [r for r in to_coco_results(ids, scores, labels, boxes) if r["score"] > 0]
    assert len(res) == sum(len(g[1]) for g in gt)  # the repeated image contributes once
    stats, table = coco_stats(ds.coco, res)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    assert "Average Precision" in table and len(table.strip().splitlines()) == 12
    # drop the detections of image 1: it counts as missed, recall falls below 1
    part = [r for r in res if r["image_id"] != gt[0][0]]
    stats2, _ = coco_stats(ds.coco, part)
    assert stats2["AR100"] < 1.0 and stats2["AR100"] > 0
    stats3, _ = coco_stats(ds.coco, part, img_ids=[g[0] for g in gt[1:]])
    assert stats3["AR100"] == pytest.approx(1.0)
    zero, _ = coco_stats(ds.coco, [])
    assert zero == {k: 0.0 for k in STAT_NAMES}


def test_progress_bar_plain_lines():
    buf = io.StringIO()
    bar = ProgressBar("epoch 1/2", 10, stream=buf)
    bar.update(5, loss=1.25, **{"img/s": 99.5})
    bar.close()
    line = buf.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    assert "epoch 1/2" in line and "5/10" in line and "loss 1.2500" in line and "99.5 img/s" in line
    silent = io.StringIO()
    ProgressBar("x", 3, stream=silent, enabled=False).update(1, loss=1.0)
    assert silent.getvalue() == ""


# -------------------------------------------------------------------------------------------------------- CUDA

@pytest.mark.needs_cuda
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_cuda_training_with_autocast(tmp_path, amp):
    pytest.importorskip("pycocotools")
    cfg = tiny_cfg(tmp_path, "train.device=cuda", f"train.amp={amp}", "train.epochs=2", "train.eval_every=1")
    result = train(cfg, loader_fn=fake_loader_fn())
    losses = [r["train_loss"] for r in result["epochs"]]
    assert all(math.isfinite(v) for v in losses)
    assert set(result["eval"]) == set(STAT_NAMES)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    assert "cuda" in ckpt["rng"][0]
    assert ("scaler" in ckpt) == (amp == "fp16")
    assert all(v.device.type == "cpu" for v in ckpt["model"].values())


@pytest.mark.needs_cuda
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_cuda_train_step_never_syncs(amp):
    """torch.cuda sync debug mode 'error' raises on any host-device synchronization inside the step."""
    from detr_fast.criterion import build_criterion
    from detr_fast.engine import build_optimizer, train_step
    from detr_fast.evaluation import autocast_context
    from detr_fast.models import build_detr
    from detr_fast.ops import has_kernel

    if not (has_kernel("linear_assignment", "cuda") and has_kernel("matching_cost", "cuda")):
        pytest.skip("the CUDA matcher kernels are not built: the reference matcher copies to the host by design")
    device = torch.device("cuda")
    cfg = load_config(None, ["model.backbone=light", "model.hidden_dim=64", "model.enc_layers=2", "model.dec_layers=3",
                             "model.dim_feedforward=128", "model.num_queries=10", "model.num_classes=2",
                             f"train.amp={amp}"])
    model = build_detr(cfg).to(device)
    criterion = build_criterion(cfg).to(device)
    optimizer, _ = build_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    amp_ctx = autocast_context(device, amp)
    loader = FakeLoader(FakeDetection(8, seed=4), 4, shuffle=False)
    batches = [b.to(device) for b in loader]
    keys, weights, _ = train_step(model, criterion, batches[0], optimizer, amp_ctx=amp_ctx, scaler=scaler,
                                  clip_max_norm=0.1)  # warm-up (first-call allocations, the weights tensor)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in batches:
            keys, weights, row = train_step(model, criterion, b, optimizer, amp_ctx=amp_ctx, scaler=scaler,
                                            clip_max_norm=0.1, weights=weights, keys=keys)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(row).all()


def test_fixed_shape_training_and_cuda_graph_config_errors(tmp_path):
    from detr_fast.config import ConfigError

    cfg = tiny_cfg(tmp_path / "pad", "train.epochs=1", "train.eval_every=0", "data.pad_to=[64, 96]",
                   "data.max_targets=5")
    rec = train(cfg, loader_fn=fake_loader_fn())["epochs"][0]
    assert math.isfinite(rec["train_loss"]) and rec["images"] == 16
    with pytest.raises(ConfigError, match="fixed shapes"):
        tiny_cfg(tmp_path, "train.cuda_graph=true")
    with pytest.raises(ConfigError, match="fp16"):
        tiny_cfg(tmp_path, "train.cuda_graph=true", "train.amp=fp16", "data.pad_to=[96]", "data.max_targets=5")
    with pytest.raises(ConfigError, match="own query"):
        tiny_cfg(tmp_path, "data.max_targets=6")
    with pytest.raises(ConfigError, match="needs a GPU"):
        train(tiny_cfg(tmp_path / "g", "train.cuda_graph=true", "data.pad_to=[96]", "data.max_targets=5"),
              loader_fn=fake_loader_fn())


@pytest.mark.needs_cuda
@pytest.mark.parametrize("amp,extra", [("none", ()), ("bf16", ()), ("bf16", FAST_OPTIONS)],
                         ids=["none", "bf16", "bf16_fast_options"])
def test_cuda_graph_training_equals_eager(tmp_path, amp, extra):
    """train.cuda_graph replays compute the eager steps' losses (same padded shapes, same batches, dropout 0), also
    with every fast option on."""
    from detr_fast.ops import has_kernel

    if not (has_kernel("linear_assignment", "cuda") and has_kernel("matching_cost", "cuda")):
        pytest.skip("the CUDA matcher kernels are not built")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    common = ("train.device=cuda", f"train.amp={amp}", "train.epochs=2", "train.eval_every=0",
              "data.pad_to=[64, 96]", "data.max_targets=5", "train.warmup_steps=3", "train.lr_schedule=cosine",
              *extra)
    eager = train(tiny_cfg(tmp_path / "eager", *common), loader_fn=fake_loader_fn())["epochs"]
    graph = train(tiny_cfg(tmp_path / "graph", *common, "train.cuda_graph=true"), loader_fn=fake_loader_fn())["epochs"]
    for a, b in zip(eager, graph):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=2e-3 if amp == "bf16" else 1e-4)
        assert b["lr"] == pytest.approx(a["lr"])


@pytest.mark.needs_cuda
def test_cuda_graph_several_shapes_epochs_and_evaluations(tmp_path, monkeypatch):
    """One graph per padded shape (batches of one image: 32x32 and 24x32 buckets), replayed over three epochs with an
    evaluation after each: every epoch's loss equals the eager run's. A tensor the captured step reads (the loss
    weights) must stay alive across epochs for this to hold."""
    import detr_fast.engine as engine
    from detr_fast.ops import has_kernel

    if not (has_kernel("linear_assignment", "cuda") and has_kernel("matching_cost", "cuda")):
        pytest.skip("the CUDA matcher kernels are not built")
    runners = []

    class Recording(engine.GraphRunner):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            runners.append(self)

    monkeypatch.setattr(engine, "GraphRunner", Recording)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    common = ("train.device=cuda", "train.epochs=3", "train.eval_every=1", "data.batch_size=1",
              "data.pad_to=[24, 32]", "data.max_targets=5", "train.warmup_steps=3")
    eager = train(tiny_cfg(tmp_path / "eager", *common), loader_fn=fake_loader_fn())["epochs"]
    graph = train(tiny_cfg(tmp_path / "graph", *common, "train.cuda_graph=true"), loader_fn=fake_loader_fn())["epochs"]
    assert len(runners) == 1 and len(runners[0].graphs) == 2
    for a, b in zip(eager, graph):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["AP50"] == pytest.approx(a["AP50"], abs=1e-3)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("first_graph", [False, True], ids=["eager_then_graph", "graph_then_eager"])
def test_resume_across_cuda_graph_setting(tmp_path, first_graph):
    """A checkpoint written with one train.cuda_graph setting resumes under the other (the optimizer's saved
    capturable flag and LR type follow the resuming run)."""
    from detr_fast.ops import has_kernel

    if not (has_kernel("linear_assignment", "cuda") and has_kernel("matching_cost", "cuda")):
        pytest.skip("the CUDA matcher kernels are not built")
    common = ("train.device=cuda", "train.eval_every=0", "data.pad_to=[32]", "data.max_targets=5")
    flag = lambda on: f"train.cuda_graph={str(on).lower()}"  # noqa: E731
    train(tiny_cfg(tmp_path / "run", "train.epochs=1", flag(first_graph), *common), loader_fn=fake_loader_fn())
    resumed = train(tiny_cfg(tmp_path / "run", "train.epochs=2", flag(not first_graph), *common,
                             f"train.resume={tmp_path / 'run' / 'checkpoint.pth'}"), loader_fn=fake_loader_fn())
    assert [r["epoch"] for r in resumed["epochs"]] == [1] and math.isfinite(resumed["epochs"][0]["train_loss"])


def test_match_param_groups_after_loading_another_runs_state():
    """A state dict saved by a CUDA-graph run (capturable, LR tensors) loaded into an eager run's optimizer: the
    groups get this run's flag and float LRs back, and a step runs without complaint."""
    from detr_fast.engine import match_param_groups

    p = torch.nn.Parameter(torch.randn(4))
    saver = torch.optim.AdamW([p], lr=1e-3, fused=True)
    p.grad = torch.randn(4)
    saver.step()
    state = saver.state_dict()
    state["param_groups"][0]["capturable"] = True
    state["param_groups"][0]["lr"] = torch.tensor(2e-3)
    opt = torch.optim.AdamW([p], lr=1e-3, fused=True)
    opt.load_state_dict(state)
    assert opt.param_groups[0]["capturable"] is True and isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    match_param_groups(opt, capturable=False)
    g = opt.param_groups[0]
    assert g["capturable"] is False and isinstance(g["lr"], float) and g["lr"] == pytest.approx(2e-3)
    with warnings_as_errors():
        opt.step()


@contextlib.contextmanager
def warnings_as_errors():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)])
def test_async_readback_returns_windows_in_order(device):
    from detr_fast.engine import AsyncReadback

    rb = AsyncReadback()
    vals = [torch.tensor([float(i), 2.0 * i], device=device) for i in range(3)]
    for i, v in enumerate(vals):
        rb.push(v, i)
        v.add_(100.0)  # later changes to the source must not show: the copy was queued before them
    got = rb.ready(wait=True)
    assert [p for _, p in got] == [0, 1, 2]
    assert [w for w, _ in got] == [[0.0, 0.0], [1.0, 2.0], [2.0, 4.0]]
    assert rb.ready() == [] and rb.ready(wait=True) == []
    if device == "cpu":  # on the CPU a window is ready at once
        rb.push(torch.tensor([5.0]), "x")
        assert rb.ready() == [([5.0], "x")]
