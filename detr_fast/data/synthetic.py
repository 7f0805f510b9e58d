"""The embedded default dataset: synthetic scenes of simple shapes, written as JPEGs plus COCO instances JSON.

    make_shapes("data/shapes", num_train=4000, num_val=500, image_size=128, seed=0)

writes
    data/shapes/train/000000000001.jpg ...   data/shapes/val/...
    data/shapes/annotations/instances_train.json, instances_val.json

Each scene holds 1-4 shapes of `num_classes` classes (category ids 0..num_classes-1) with random colors, sizes
(15%..60% of the side) and positions over a solid, gradient or noise background. Shapes may overlap, but a
placement that would hide more than MAX_HIDDEN of an earlier shape is rejected, so each object stays identifiable.
Boxes are tight around each drawn shape (its full silhouette). Everything follows from the seed: each image has
its own random stream derived from (seed, split, index), so the output bytes are identical from run to run.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = ("rectangle", "ellipse", "triangle", "cross", "star", "diamond")
MAX_HIDDEN = 0.3  # largest fraction of an earlier shape's silhouette that later shapes may cover
MIN_REL_SIZE, MAX_REL_SIZE = 0.15, 0.60
JPEG_QUALITY = 90
GENERATOR_VERSION = 1  # bump when the rendering changes: sets on disk from an older one then no longer match
_SPLITS = {"train": 0, "val": 1}


def _polygon(cls: int, x0: float, y0: float, w: float, h: float, rng: np.random.Generator):
    """Vertices of shape `cls` inside the box (x0, y0, w, h), or None for the ellipse/rectangle primitives."""
    name = CLASS_NAMES[cls]
    if name == "triangle":
        apex = x0 + w * rng.uniform(0.2, 0.8)
        pts = [(apex, y0), (x0 + w, y0 + h), (x0, y0 + h)]
        if rng.random() < 0.5:  # pointing down
            pts = [(x, 2 * y0 + h - y) for x, y in pts]
        return pts
    if name == "cross":
        t = rng.uniform(0.28, 0.42)
        ax0, ax1 = x0 + w * (0.5 - t / 2), x0 + w * (0.5 + t / 2)
        ay0, ay1 = y0 + h * (0.5 - t / 2), y0 + h * (0.5 + t / 2)
        return [(ax0, y0), (ax1, y0), (ax1, ay0), (x0 + w, ay0), (x0 + w, ay1), (ax1, ay1), (ax1, y0 + h),
                (ax0, y0 + h), (ax0, ay1), (x0, ay1), (x0, ay0), (ax0, ay0)]
    if name == "star":
        cx, cy, inner = x0 + w / 2, y0 + h / 2, rng.uniform(0.38, 0.5)
        pts = []
        for k in range(10):
            ang = -math.pi / 2 + k * math.pi / 5
            r = 1.0 if k % 2 == 0 else inner
            pts.append((cx + r * w / 2 * math.cos(ang), cy + r * h / 2 * math.sin(ang)))
        return pts
    if name == "diamond":
        return [(x0 + w / 2, y0), (x0 + w, y0 + h / 2), (x0 + w / 2, y0 + h), (x0, y0 + h / 2)]
    return None


def _draw(draw: ImageDraw.ImageDraw, cls: int, box: tuple[float, float, float, float], poly, fill) -> None:
    x0, y0, w, h = box
    name = CLASS_NAMES[cls]
    if name == "rectangle":
        draw.rectangle([x0, y0, x0 + w - 1, y0 + h - 1], fill=fill)
    elif name == "ellipse":
        draw.ellipse([x0, y0, x0 + w - 1, y0 + h - 1], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """[size, size, 3] float32 in 0..255: solid, linear gradient or smoothed noise."""
    kind = rng.integers(3)
    base = rng.uniform(0, 255, 3).astype(np.float32)
    if kind == 0:
        return np.broadcast_to(base, (size, size, 3)).copy()
    if kind == 1:
        other = rng.uniform(0, 255, 3).astype(np.float32)
        ang = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
        t = (xs * math.cos(ang) + ys * math.sin(ang))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return base + (other - base) * t[..., None]
    coarse = rng.uniform(-60, 60, (8, 8, 3)).astype(np.float32)
    up = np.asarray(Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize((size, size),
                                                                                             Image.BILINEAR),
                    dtype=np.float32) - 128
    fine = rng.normal(0, 12, (size, size, 3)).astype(np.float32)
    return np.clip(base + up + fine, 0, 255)


def _render(size: int, num_classes: int, rng: np.random.Generator):
    """One scene -> (RGB uint8 array [size, size, 3], list of (category_id, [x, y, w, h], area))."""
    bg = _background(size, rng)
    canvas = Image.fromarray(bg.astype(np.uint8))
    n_objects = int(rng.integers(1, 5))
    silhouettes: list[np.ndarray] = []  # full masks of placed shapes
    visible: list[np.ndarray] = []  # their still-visible parts
    colors: list[np.ndarray] = []
    objects = []
    for _ in range(n_objects):
        for _attempt in range(30):
            cls = int(rng.integers(num_classes))
            w = rng.uniform(MIN_REL_SIZE, MAX_REL_SIZE) * size
            h = float(np.clip(w * rng.uniform(0.6, 1.67), MIN_REL_SIZE * size, MAX_REL_SIZE * size))
            if CLASS_NAMES[cls] in ("star", "cross"):
                h = w * rng.uniform(0.85, 1.15)
            w, h = max(round(w), 4), max(round(h), 4)
            x0 = float(rng.integers(0, size - w + 1))
            y0 = float(rng.integers(0, size - h + 1))
            poly = _polygon(cls, x0, y0, w, h, rng)
            mask_img = Image.new("L", (size, size), 0)
            _draw(ImageDraw.Draw(mask_img), cls, (x0, y0, w, h), poly, 255)
            mask = np.asarray(mask_img) > 0
            if mask.sum() < 16:
                continue
            if any((vis & ~mask).sum() < (1 - MAX_HIDDEN) * sil.sum() for sil, vis in zip(silhouettes, visible)):
                continue  # would hide too much of an earlier shape
            # a color that stands out from the background under the shape and from the shapes it touches
            under = bg[mask].mean(axis=0)
            touching = [c for c, sil in zip(colors, silhouettes) if (sil & mask).any()]
            for _c in range(20):
                color = rng.uniform(0, 255, 3)
                if np.linalg.norm(color - under) > 90 and all(np.linalg.norm(color - c) > 70 for c in touching):
                    break
            else:
                continue
            canvas.paste(tuple(int(c) for c in color), mask=mask_img)
            visible = [vis & ~mask for vis in visible]
            silhouettes.append(mask)
            visible.append(mask.copy())
            colors.append(color)
            ys, xs = np.nonzero(mask)
            bx, by = int(xs.min()), int(ys.min())
            bbox = [bx, by, int(xs.max()) - bx + 1, int(ys.max()) - by + 1]
            objects.append((cls, bbox, int(mask.sum())))
            break
    return np.asarray(canvas), objects


def _render_one(args) -> list:
    """Render and write one image; returns its (category_id, bbox, area) objects. A top-level function, so a process
    pool can run it."""
    img_dir, split, index, size, seed, num_classes = args
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    pixels, objects = _render(size, num_classes, rng)
    Image.fromarray(pixels).save(Path(img_dir) / f"{index + 1:012d}.jpg", format="JPEG", quality=JPEG_QUALITY)
    return objects


def _write_split(out: Path, split: str, num: int, size: int, seed: int, num_classes: int, pool=None) -> None:
    img_dir = out / split
    img_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(str(img_dir), split, i, size, seed, num_classes) for i in range(num)]
    # each image has its own random stream, so the bytes do not depend on how the work is spread
    results = pool.imap(_render_one, jobs, chunksize=64) if pool is not None else map(_render_one, jobs)
    images, annotations = [], []
    ann_id = 1  # COCOeval treats annotation id 0 as "unmatched": ids start at 1
    for i, objects in enumerate(results):
        image_id = i + 1
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": size, "height": size})
        for cls, bbox, area in objects:
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": cls, "bbox": bbox,
                                "area": area, "iscrowd": 0})
            ann_id += 1
    categories = [{"id": c, "name": CLASS_NAMES[c], "supercategory": "shape"} for c in range(num_classes)]
    doc = {"info": {"description": f"detr_fast synthetic shapes, seed {seed}, split {split}"},
           "images": images, "annotations": annotations, "categories": categories}
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    with open(out / "annotations" / f"instances_{split}.json", "w") as f:
        json.dump(doc, f)


PARAMS_FILE = "shapes.json"  # the parameters a generated set was made with (ensure_dataset compares them)


def shapes_params(num_train: int, num_val: int, image_size: int, seed: int, num_classes: int) -> dict:
    return {"num_train": int(num_train), "num_val": int(num_val), "image_size": int(image_size), "seed": int(seed),
            "num_classes": int(num_classes), "version": GENERATOR_VERSION}


def make_shapes(out_dir, num_train: int = 4000, num_val: int = 500, image_size: int = 128, seed: int = 0,
                num_classes: int = 4, replace: bool = True, workers: int = 0) -> Path:
    """Render the shapes dataset into out_dir (train/, val/, annotations/instances_{train,val}.json).

    The set is built in a temporary folder next to out_dir and moved into place at the end, so an interrupted run
    never leaves a half-written dataset behind. An existing out_dir is replaced when `replace`; otherwise (two
    processes generating the same set at once) the one that finishes second keeps the first one's copy.
    workers > 1 renders in that many processes (the output is the same bytes); 0 uses one per CPU core.
    A `shapes.json` next to the splits records the parameters. Returns out_dir as a Path.
    """
    if not 1 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be in 1..{len(CLASS_NAMES)}, got {num_classes}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    if num_train < 0 or num_val < 0:
        raise ValueError("num_train and num_val must be >= 0")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    if workers <= 0:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(workers, max(1, (num_train + num_val) // 64))
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        _write_split(tmp, "train", num_train, image_size, seed, num_classes, pool)
        _write_split(tmp, "val", num_val, image_size, seed, num_classes, pool)
        (tmp / PARAMS_FILE).write_text(json.dumps(shapes_params(num_train, num_val, image_size, seed, num_classes)))
        if replace and out.exists():
            shutil.rmtree(out)
        try:
            os.rename(tmp, out)
        except OSError:
            if replace or not (out / "annotations" / "instances_val.json").exists():
                raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
