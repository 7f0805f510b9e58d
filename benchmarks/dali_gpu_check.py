"""DALI mixed-path diagnosis in one short run (about 40 s on a GPU); exit status 1 when a check fails.

    python benchmarks/dali_gpu_check.py              # on a GPU: cpu vs mixed, on-device extent check, old-race count
    python benchmarks/dali_gpu_check.py --mixed none # without a GPU: cpu vs cpu (the script itself runs)

1. extent: on the device, before any host read, for every batch: every channel of every pixel inside
   sizes (h, w) is non-zero and every padded pixel is zero, i.e. (images != 0).all(1) == ~mask. A normalized
   uint8 pixel is never exactly 0 (255 * mean is not an integer), so this pins the real resized extent to meta.
2. cpu_vs_mixed: the same loader (val, and train with each pinned choice of tests/test_dali.PINS) with
   device_id=None and with the GPU; sizes / orig sizes / labels must be equal, boxes within 1e-4 (relative),
   images within a few levels of 255.
3. race: the pre-5272c60 read (t.to("cpu", non_blocking=True) read at once) against the synchronized values.
   A non-zero count reproduces the old failure mode on this machine.
4. exif: one JPEG with EXIF orientation 6: size, original size and box against the torch pipeline (both use the
   stored pixel grid).
"""
import argparse
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
warnings.simplefilter("ignore", RuntimeWarning)

from test_dali import PINS, T_denorm, add_items, color_cfg, write_color_set  # noqa: E402

from detr_fast.data import build_dataset  # noqa: E402
from detr_fast.data.dali import DaliLoader, padding_mask  # noqa: E402


def items(loader, extent_fails, race=None):
    out = {}
    for batch in loader:
        on_dev = ((batch.images != 0).all(1) == ~batch.mask).all() & \
            (batch.mask == padding_mask(batch.sizes, *batch.mask.shape[1:])).all()
        if race is not None and batch.images.is_cuda:
            old = batch._map(lambda t: t.to("cpu", non_blocking=True))  # the pre-fix Batch.to
            snap = [old.sizes.clone(), old.mask.clone(), old.image_ids.clone()]  # read at once, as the tests did
            torch.cuda.synchronize()
            race[0] += 1
            race[1] += int(not (torch.equal(snap[0], old.sizes) and torch.equal(snap[1], old.mask)
                                and torch.equal(snap[2], old.image_ids)))
        b = batch.to("cpu")
        if not bool(on_dev):
            extent_fails.append([int(i) for i in b.image_ids])
        add_items(b, out)
    return out


def compare(name, a, b):
    bad = []
    if set(a) != set(b):
        bad.append(f"ids {sorted(set(a) ^ set(b))}")
    img_mean = img_max = box_max = 0.0
    for k in sorted(set(a) & set(b)):
        ia, ba, la, sa, oa = a[k]
        ib, bb, lb, sb, ob = b[k]
        if sa != sb or oa != ob:
            bad.append(f"id {k}: size {sa} vs {sb}, orig {oa} vs {ob}")
            continue
        if la.tolist() != lb.tolist():
            bad.append(f"id {k}: labels {la.tolist()} vs {lb.tolist()}")
            continue
        if len(ba):
            box_max = max(box_max, float((ba - bb).abs().max()))
        d = (T_denorm(ia) - T_denorm(ib)).abs()
        img_mean, img_max = max(img_mean, float(d.mean())), max(img_max, float(d.max()))
    ok = not bad and box_max < 1e-4 and img_mean < 2.0
    print(f"{name:12s} {'OK  ' if ok else 'FAIL'} images {len(a)}/{len(b)} | worst image mean|d| {img_mean:.2f} "
          f"max|d| {img_max:.0f} (of 255) | worst box |d| {box_max:.2e}" + ("".join("\n    " + s for s in bad[:6])))
    return ok


def exif_check(tmp, mixed):
    from detr_fast.config import load_config

    root = tmp / "exif"
    (root / "val").mkdir(parents=True)
    (root / "annotations").mkdir()
    arr = np.full((120, 160, 3), 128, np.uint8)
    arr[20:50, 10:60] = (255, 0, 0)
    ex = Image.Exif()
    ex[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(arr).save(root / "val" / "a.jpg", quality=95, subsampling=0, exif=ex.tobytes())
    doc = {"images": [{"id": 1, "file_name": "a.jpg", "width": 160, "height": 120}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 20, 50, 30], "area": 1500,
                            "iscrowd": 0}], "categories": [{"id": 1, "name": "r"}]}
    ann = root / "annotations" / "instances_val.json"
    ann.write_text(json.dumps(doc))
    cfg = load_config(ROOT / "configs" / "shapes.yaml", [
        f"data.val_images={root / 'val'}", f"data.val_ann={ann}", f"data.train_images={root / 'val'}",
        f"data.train_ann={ann}", "model.num_classes=4", "data.batch_size=1", "data.num_workers=1",
        "data.val_size=120", "data.max_size=400", "train.device=cpu"])
    ds = build_dataset(cfg, "val")
    _, t = ds[0]
    print(f"exif torch   size {t['size']} orig {t['orig_size']} box {[round(v, 3) for v in t['boxes'][0].tolist()]}")
    ok = True
    for dev in ("cpu", "mixed") if mixed is not None else ("cpu",):
        got = items(DaliLoader(cfg, "val", ds, seed=0, device_id=mixed if dev == "mixed" else None), [])
        _, boxes, _, size, orig = got[1]
        same = size == t["size"] and orig == tuple(t["orig_size"])
        ok &= same
        print(f"exif {dev:5s} size {size} orig {orig} box {[round(v, 3) for v in boxes[0].tolist()]} "
              f"{'= torch' if same else '!= torch'}")
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mixed", default="0", help="GPU index for the mixed loader, or 'none' (cpu vs cpu)")
    args = ap.parse_args()
    mixed = None if args.mixed == "none" else int(args.mixed)
    if mixed is not None and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --mixed none")
    tmp = Path(tempfile.mkdtemp())
    try:
        root = tmp / "colors"
        write_color_set(root)
        cfg = color_cfg(root)
        extent, race, all_ok = [], [0, 0], True
        ds = build_dataset(cfg, "val")
        a = items(DaliLoader(cfg, "val", ds, seed=0), extent)
        b = items(DaliLoader(cfg, "val", ds, seed=0, device_id=mixed), extent, race)
        all_ok &= compare("val", a, b)
        ds = build_dataset(cfg, "train")
        for k, p in enumerate(PINS):
            a = items(DaliLoader(cfg, "train", ds, seed=0, pinned=p), extent)
            b = items(DaliLoader(cfg, "train", ds, seed=0, device_id=mixed, pinned=p), extent, race)
            all_ok &= compare(f"pin{k}", a, b)
        # random choices: same seed, same reader order -> same draws if the executor calls AugmentParams in order
        a = items(DaliLoader(cfg, "train", ds, seed=3), extent)
        b = items(DaliLoader(cfg, "train", ds, seed=3, device_id=mixed), extent, race)
        compare("random(info)", a, b)
        print(f"extent: {'OK' if not extent else 'FAIL, batches ' + str(extent[:4])} (image content ends exactly at "
              f"sizes, padding zero)")
        print(f"race: the pre-fix unsynchronized read differed from the synced values in {race[1]} of {race[0]} "
              f"GPU batches")
        exif_ok = exif_check(tmp, mixed)
        ok = all_ok and not extent and exif_ok
        print("CPU_VS_MIXED", "OK" if ok else "FAIL")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
