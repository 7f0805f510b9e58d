"""Data pipelines side by side: the DALI pipeline against the torch DataLoader, the same images, the same
augmentations (DETR's training transforms), the same number of CPU threads/workers.

    python benchmarks/bench_data.py                                   # the shapes set (data/shapes, generated)
    python benchmarks/bench_data.py --device cuda --make-jpegs /tmp/jpegs --threads 4   # 640x480 JPEGs, GPU
    python benchmarks/bench_data.py --device cuda --coco-root data/coco --threads 4     # COCO val2017

Variants: torch (DataLoader with `threads` worker processes, PIL decode + transforms, collate, pinned, copied to
the device), dali_cpu (DALI with `threads` threads, decode and augmentation on the CPU), dali_mixed (nvJPEG /
hardware decode and augmentation on the GPU; only with --device cuda). Each variant runs `--repeats` timed
windows after a warm-up; the table gives medians of images/s, CPU seconds per 1,000 images (this process, its
threads and its worker processes) and CPU cores kept busy. Times are never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detr_fast.bench import format_table  # noqa: E402
from detr_fast.config import load_config  # noqa: E402
from detr_fast.data import build_dataset, collate, ensure_dataset  # noqa: E402
from detr_fast.data import EpochSampler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- 640x480 JPEG set

def _render_jpeg(args):
    """One 640x480 scene: smooth colored background, 2-12 filled rectangles/ellipses; returns its annotations."""
    out_dir, index, seed = args
    rng = np.random.default_rng([seed, index])
    w, h = 640, 480
    coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    bg = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.float32)
    bg = np.clip(bg + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(bg)
    draw = ImageDraw.Draw(img)
    anns = []
    for _ in range(int(rng.integers(2, 13))):
        bw, bh = int(rng.integers(24, 320)), int(rng.integers(24, 240))
        x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cls = int(rng.integers(0, 2))
        (draw.rectangle if cls == 0 else draw.ellipse)([x0, y0, x0 + bw - 1, y0 + bh - 1], fill=color)
        anns.append({"category_id": cls, "bbox": [x0, y0, bw, bh], "area": bw * bh, "iscrowd": 0})
    name = f"{index + 1:012d}.jpg"
    img.save(Path(out_dir) / "val2017" / name, quality=90)
    return name, anns


def make_jpegs(out: Path, n: int, seed: int = 0) -> Path:
    """A COCO-layout set of n 640x480 JPEGs at out/val2017 + out/annotations/instances_val2017.json (reused when
    it already holds n images)."""
    ann = out / "annotations" / "instances_val2017.json"
    if ann.exists() and len(json.loads(ann.read_text())["images"]) == n:
        return out
    (out / "val2017").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    with Pool(min(16, os.cpu_count() or 1)) as pool:
        rendered = pool.map(_render_jpeg, [(str(out), i, seed) for i in range(n)], chunksize=16)
    images, annotations = [], []
    for i, (name, anns) in enumerate(rendered):
        images.append({"id": i + 1, "file_name": name, "width": 640, "height": 480})
        for a in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **a})
    cats = [{"id": 0, "name": "rectangle"}, {"id": 1, "name": "ellipse"}]
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return out


# ------------------------------------------------------------------------------------------- measurement

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads) and of its live child processes."""
    t = os.times()
    total = t.user + t.system
    pids = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            pids.update(int(p) for p in (task / "children").read_text().split())
        except OSError:
            pass
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def endless(loader):
    """Batches from a loader, epoch after epoch."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def measure(batches, device: torch.device, warmup: int, count: int, repeats: int) -> list[dict]:
    """Time `repeats` windows of `count` batches each after `warmup` batches; every batch is moved to the device
    (a no-op for DALI's) and the device synchronized at the end of each window."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        next(batches).to(device, non_blocking=True)
    sync()
    results = []
    for _ in range(repeats):
        c0, t0, n = cpu_seconds(), time.perf_counter(), 0
        for _ in range(count):
            b = next(batches).to(device, non_blocking=True)
            n += b.images.shape[0]
        sync()
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        results.append({"img_s": n / wall, "cpu_ms_img": 1000 * cpu / n, "cores": cpu / wall})
    return results


def torch_loader(cfg, threads: int, device: torch.device):
    dataset = build_dataset(cfg, "train")
    sampler = EpochSampler(dataset, shuffle=True, seed=0)
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.data.batch_size, sampler=sampler, num_workers=threads, collate_fn=collate,
        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=threads > 0,
        prefetch_factor=4 if threads > 0 else None,
        worker_init_fn=(lambda _: torch.set_num_threads(1)) if threads > 0 else None)


def dali_loader(cfg, threads: int, device_id):
    from detr_fast.data.dali import DaliLoader

    dataset = build_dataset(cfg, "train")
    return DaliLoader(cfg, "train", dataset, seed=0, device_id=device_id, num_threads=threads)


def versions() -> str:
    parts = [f"torch {torch.__version__}", f"CUDA {torch.version.cuda}", f"Python {platform.python_version()}",
             f"Pillow {Image.__version__}"]
    try:
        import nvidia.dali as dali

        parts.append(f"DALI {dali.__version__}")
    except ImportError:
        parts.append("DALI not installed")
    return " | ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=4, help="DataLoader workers = DALI CPU threads")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--coco-root", default="", help="a COCO folder: its val2017 images with the train transforms")
    ap.add_argument("--make-jpegs", default="", metavar="DIR", help="synthesize 640x480 JPEGs in DIR and use them")
    ap.add_argument("--num-jpegs", type=int, default=2000)
    ap.add_argument("--shapes-root", default=str(ROOT / "data" / "shapes"))
    ap.add_argument("--variants", default="torch,dali_cpu,dali_mixed")
    ap.add_argument("--warmup", type=int, default=3, help="batches before timing")
    ap.add_argument("--batches", type=int, default=0, help="batches per timed window (0: about 2 epochs' worth "
                                                          "for DALI, capped at 40; 6 for torch)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="", help="write the rows here too")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device")
    device = torch.device(args.device)

    common = [f"data.batch_size={args.batch_size}", f"data.num_workers={args.threads}",
              f"train.device={args.device}"]
    if args.coco_root or args.make_jpegs:
        root = Path(args.coco_root) if args.coco_root else make_jpegs(Path(args.make_jpegs), args.num_jpegs)
        ann = root / "annotations" / "instances_val2017.json"
        cfg = load_config(ROOT / "configs" / "detr_r50_coco.yaml", common + [
            f"data.train_images={root / 'val2017'}", f"data.train_ann={ann}",
            f"data.val_images={root / 'val2017'}", f"data.val_ann={ann}"])
        what = f"{'COCO val2017' if args.coco_root else f'{args.num_jpegs} synthetic 640x480 JPEGs'} at {root}"
    else:
        cfg = load_config(ROOT / "configs" / "shapes.yaml", common + [f"data.root={args.shapes_root}"])
        ensure_dataset(cfg)
        what = f"shapes set at {args.shapes_root} ({cfg.data.shapes_image_size} px)"

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()})"
    print(f"device: {dev_name} | {os.cpu_count()} cores visible | {versions()}")
    print(f"data: {what} | batch {args.batch_size} | threads {args.threads} | DETR train transforms "
          f"(scales {cfg.data.scales[0]}..{cfg.data.scales[-1]}, max {cfg.data.max_size})")
    rows = []
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if variant == "dali_mixed" and device.type != "cuda":
            continue
        try:
            if variant == "torch":
                loader = torch_loader(cfg, args.threads, device)
                count = args.batches or 6
            elif variant in ("dali_cpu", "dali_mixed"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    gpu = (device.index or 0) if variant == "dali_mixed" else None
                    loader = dali_loader(cfg, args.threads, gpu)
                count = args.batches or max(4, min(40, 2 * len(loader)))
            else:
                raise ValueError(f"unknown variant {variant!r}")
        except (ImportError, RuntimeError) as exc:
            print(f"{variant}: skipped ({exc})")
            continue
        res = measure(endless(loader), device, args.warmup, count, args.repeats)
        row = {"variant": variant, "batches": count * args.repeats}
        for key in ("img_s", "cpu_ms_img", "cores"):
            row[key] = statistics.median(r[key] for r in res)
        rows.append(row)
        print(f"{variant}: " + ", ".join(f"{r['img_s']:.1f} img/s" for r in res), flush=True)
        del loader
    base = next((r["img_s"] for r in rows if r["variant"] == "torch"), None)
    for r in rows:
        r["vs_torch"] = r["img_s"] / base if base else None
        r["img_s_per_core"] = r["img_s"] / max(r["cores"], 1e-9)
    print()
    print(format_table(rows, ["variant", "img_s", "vs_torch", "cpu_ms_img", "cores", "img_s_per_core", "batches"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev_name, "versions": versions(), "data": what,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
