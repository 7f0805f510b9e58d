"""NVIDIA DALI pipeline: COCO JPEGs to padded batches with DETR's augmentations, decoded and augmented on the GPU.

    loader = DaliLoader(cfg, "train", dataset, rank=r, world_size=R, seed=s, device_id=torch.cuda.current_device())
    loader.set_epoch(epoch)          # (also loader.sampler.set_epoch)
    for batch in loader: ...         # detr_fast.data.Batch, its tensors already on the GPU

Graph per sample: fn.readers.coco (relative ltrb boxes, raw category ids, crowd dropped, sharded by rank, a new
global permutation each epoch) -> decode (`mixed`: nvJPEG / hardware decoder on the GPU; `cpu` when device_id is
None) -> one resize of a region of interest, which performs DETR's resize / crop / resize -> mirror + normalize
(crop_mirror_normalize, CHW float32) -> pad to the batch's largest image. The random choices are those of
transforms.make_train_transforms with the same distributions: flip with p = 0.5; with p = 0.5 the short side to a
uniform choice of `scales` (long side <= max_size); otherwise the short side to a choice of `crop_resize`, a crop
whose width and height are uniform integers in [crop_min, crop_max] (clamped to the image) at a uniform integer
position, then the short side to a choice of `scales` (long side <= max_size). Image sizes follow
transforms.resized_shape in integer arithmetic (the long side truncated). The resize + crop + resize is done as a
single resampling of the matching region of the decoded image, which saves a pass and a second blur; the boxes are
exact. Validation: short side val_size, long side <= max_size, no randomness.

Boxes are computed per sample on the CPU (a few scalars), clipped to the crop and written as normalized cxcywh;
boxes left without area are removed on the device by a stable compaction (`compact_targets`), so T is the batch's
largest box count before the crop (padding rows, as always, hold zeros and lie beyond num_targets).

Unreadable images: DALI's decoder cannot skip a sample, so the image files are checked when the loader is built
(JPEG start and end markers; a file failing that is decoded with PIL to decide). Files that fail are left out with a
warning and counted in `skipped` of the first batch of every epoch on rank 0. A file that passes this check but
still fails to decode stops the pipeline with an error naming it (data.pipeline=torch skips such files).

Epochs: a pipeline is built with seeds derived from (seed, epoch) for the epoch it starts at, and then runs from
epoch to epoch (DALI draws a new permutation and new augmentations each epoch) without a rebuild, because a
rebuild re-reads the annotation file (seconds on COCO). It is rebuilt only when the epoch asked for is not the one
it has reached (a resume, or an epoch left early). So a run is reproducible from its seed, but a run resumed at
epoch k sees other (equally distributed) data from epoch k on than the uninterrupted run; the torch loader, whose
order and augmentation follow (seed, epoch) alone, resumes exactly.
"""
from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .transforms import IMAGENET_MEAN, IMAGENET_STD


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Pinned:
    """Fixed random choices for tests (None = random): flip; crop_branch (True: resize-crop-resize, False: the
    plain multi-scale resize); crop_resize (short side before the crop); crop = (top, left, height, width) in pixels
    of the flipped, crop_resize'd image (as transforms.Crop); scale (the final short side)."""

    flip: bool | None = None
    crop_branch: bool | None = None
    crop_resize: int | None = None
    crop: tuple[int, int, int, int] | None = None
    scale: int | None = None


# ------------------------------------------------------------------------------------------- image file check

def _check_file(path: Path) -> str | None:
    """None when the file looks like a complete image, else the reason. JPEGs: start (FF D8 FF) and end (FF D9)
    markers; anything else, and JPEGs failing that test, are decoded with PIL."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(3)
            f.seek(max(size - 2, 0))
            tail = f.read(2)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    if head == b"\xff\xd8\xff" and tail == b"\xff\xd9":
        return None
    try:
        from PIL import Image

        with Image.open(path) as im:
            im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
        return f"{type(exc).__name__}: {exc}"
    return None


def scan_images(img_dir: Path, file_names: list[str], threads: int = 8) -> tuple[list[str], list[tuple[str, str]]]:
    """Split file_names into (usable, [(name, reason) for the unusable ones]), keeping the order."""
    img_dir = Path(img_dir)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        reasons = list(pool.map(lambda n: _check_file(img_dir / n), file_names, chunksize=256))
    good = [n for n, r in zip(file_names, reasons) if r is None]
    bad = [(n, r) for n, r in zip(file_names, reasons) if r is not None]
    return good, bad


# ------------------------------------------------------------------------------------------- the DALI graph

def _graph_helpers():
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    i64, f32 = types.INT64, types.FLOAT

    def as_i64(x):
        return types.Constant(int(x), dtype=i64, device="cpu") if isinstance(x, int) else fn.cast(x, dtype=i64)

    def as_f32(x):
        return fn.cast(x, dtype=f32)

    def where(cond, a, b):
        """cond (0/1 int64) ? a : b, elementwise."""
        return cond * a + (1 - cond) * b

    def resized_shape(h, w, size, max_size):
        """transforms.resized_shape on int64 per-sample scalars: (new_h, new_w)."""
        if max_size is not None:
            short, long = dmath.min(h, w), dmath.max(h, w)
            over = as_i64(long * size > max_size * short)
            size = where(over, (2 * max_size * short + long) // (2 * long), size)  # round(max * short / long)
        portrait = as_i64(w < h)
        return where(portrait, (size * h) // w, size), where(portrait, size, (size * w) // h)

    def randint(lo, hi):
        """Uniform integer in [lo, hi] (per-sample int64 scalars)."""
        u = fn.random.uniform(range=[0.0, 1.0])
        n = as_f32(hi - lo + 1)
        k = as_i64(dmath.floor(u * n))
        return lo + dmath.min(k, hi - lo)

    def choice(values, pinned):
        if pinned is not None:
            return as_i64(int(pinned))
        if len(values) == 1:
            return as_i64(int(values[0]))
        return as_i64(fn.random.uniform(values=[float(v) for v in values], dtype=types.INT32))

    def coin(pinned):
        if pinned is not None:
            return as_i64(int(bool(pinned)))
        return as_i64(fn.random.coin_flip(probability=0.5))

    return fn, types, dmath, as_i64, as_f32, where, resized_shape, randint, choice, coin


def build_pipeline(data_cfg, img_dir, ann_file, files: list[str], *, train: bool, batch_size: int, num_threads: int,
                   device_id: int | None, shard_id: int = 0, num_shards: int = 1, shuffle_seed: int = 0,
                   seed: int = 0, pinned: Pinned | None = None, prefetch: int = 2):
    """The DALI pipeline (built). Outputs per sample, all on the GPU when device_id is set:
    images [3, Hmax, Wmax] float32 (padded), sizes [2] int64 (h, w after the transforms), orig_sizes [2] int64,
    image_ids [1] int32, boxes [Tmax, 4] float32 normalized cxcywh (boxes cropped to nothing have w or h = 0),
    labels [Tmax] int32 (category ids); Tmax = the batch's largest box count, padding rows zero."""
    from nvidia.dali import pipeline_def

    fn, types, dmath, as_i64, as_f32, where, resized_shape, randint, choice, coin = _graph_helpers()
    pinned = pinned or Pinned()
    d = data_cfg
    mixed = device_id is not None

    # train: a new global permutation each epoch, cut into fixed shards; val: each pipeline keeps its shard
    if train:
        shuffle = {"shuffle_after_epoch": True, "shuffle_after_epoch_seed": shuffle_seed}
    else:
        shuffle = {"stick_to_shard": True}

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=prefetch)
    def pipe():
        encoded, boxes, labels, image_ids = fn.readers.coco(
            file_root=str(img_dir), annotations_file=str(ann_file), images=files, ltrb=True, ratio=True,
            image_ids=True, avoid_class_remapping=True, include_iscrowd=False, skip_empty=False,
            size_threshold=1e-6, shard_id=shard_id, num_shards=num_shards, pad_last_batch=True, name="reader",
            **shuffle)
        shape = fn.peek_image_shape(encoded)  # [H, W, C] int64, read from the header
        h0, w0 = as_i64(shape[0]), as_i64(shape[1])
        if train:
            flip = coin(pinned.flip)
            crop_branch = coin(pinned.crop_branch)
            r = choice(d.crop_resize, pinned.crop_resize)
            rh, rw = resized_shape(h0, w0, r, None)
            h1, w1 = where(crop_branch, rh, h0), where(crop_branch, rw, w0)
            if pinned.crop is not None:
                top, left, ch, cw = (as_i64(int(v)) for v in pinned.crop)
            else:
                cw = randint(dmath.min(w1, d.crop_min), dmath.min(w1, d.crop_max))
                ch = randint(dmath.min(h1, d.crop_min), dmath.min(h1, d.crop_max))
                top, left = randint(as_i64(0), h1 - ch), randint(as_i64(0), w1 - cw)
            top, left = where(crop_branch, top, 0), where(crop_branch, left, 0)
            ch, cw = where(crop_branch, ch, h1), where(crop_branch, cw, w1)
            s = choice(d.scales, pinned.scale)
            h2, w2 = resized_shape(ch, cw, s, d.max_size)
        else:
            flip = as_i64(0)
            h1, w1, top, left, ch, cw = h0, w0, as_i64(0), as_i64(0), h0, w0
            h2, w2 = resized_shape(h0, w0, as_i64(int(d.val_size)), d.max_size)

        # the window (top, left, ch, cw) lies in the flipped h1 x w1 image; in the unflipped one it starts at
        # w1 - left - cw. Map it to the decoded image's pixels (scale w0 / w1) and resample it to h2 x w2.
        src_left = where(flip, w1 - left - cw, left)
        sx, sy = as_f32(w0) / as_f32(w1), as_f32(h0) / as_f32(h1)
        roi_start = fn.stack(as_f32(top) * sy, as_f32(src_left) * sx)
        roi_end = fn.stack(as_f32(top + ch) * sy, as_f32(src_left + cw) * sx)
        images = fn.decoders.image(encoded, device="mixed" if mixed else "cpu", output_type=types.RGB)
        images = fn.resize(images, size=fn.stack(as_f32(h2), as_f32(w2)), roi_start=roi_start, roi_end=roi_end,
                           roi_relative=False, interp_type=types.INTERP_LINEAR, antialias=True)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=[255.0 * m for m in IMAGENET_MEAN],
                                          std=[255.0 * s_ for s_ in IMAGENET_STD],
                                          mirror=fn.cast(flip, dtype=types.INT32))
        images = fn.pad(images, axes=(1, 2), fill_value=0.0)

        # boxes: relative ltrb of the file -> flipped -> pixels of the h1 x w1 image -> the crop window, clipped,
        # normalized by the window (= by the output image)
        b = dmath.clamp(boxes, 0.0, 1.0)
        bl, bt, br, bb = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
        ff = as_f32(flip)
        bl, br = ff * (1.0 - br) + (1.0 - ff) * bl, ff * (1.0 - bl) + (1.0 - ff) * br
        fw1, fh1, fl, ft, fcw, fch = (as_f32(v) for v in (w1, h1, left, top, cw, ch))
        x0 = dmath.clamp((bl * fw1 - fl) / fcw, 0.0, 1.0)
        x1 = dmath.clamp((br * fw1 - fl) / fcw, 0.0, 1.0)
        y0 = dmath.clamp((bt * fh1 - ft) / fch, 0.0, 1.0)
        y1 = dmath.clamp((bb * fh1 - ft) / fch, 0.0, 1.0)
        cxcywh = fn.stack((x0 + x1) * 0.5, (y0 + y1) * 0.5, x1 - x0, y1 - y0, axis=1)  # [n, 4]
        cxcywh = fn.pad(cxcywh, axes=(0,), fill_value=0.0)
        labels = fn.pad(fn.reshape(labels, shape=[-1]), axes=(0,), fill_value=0)
        outs = (images, fn.stack(h2, w2), fn.stack(h0, w0), image_ids, cxcywh, labels)
        if mixed:
            outs = tuple(o if o.device == "gpu" else o.gpu() for o in outs)
        return outs

    p = pipe()
    p.build()
    return p


# ------------------------------------------------------------------------------------------- device-side assembly

def compact_targets(boxes: torch.Tensor, labels: torch.Tensor):
    """Move the boxes with area to the front of each row, keeping their order, and zero the rest.

    boxes [B, T, 4] cxcywh, labels [B, T] -> (boxes [B, T, 4], labels [B, T] int64, num_targets [B] int64).
    Runs on the tensors' device without reading values back to the host.
    """
    valid = (boxes[..., 2] > 0) & (boxes[..., 3] > 0)  # [B, T]
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # valid rows first, in order
    boxes = torch.gather(boxes, 1, order[..., None].expand_as(boxes))
    labels = torch.gather(labels.to(torch.int64), 1, order)
    num = valid.sum(1)  # [B]
    keep = torch.arange(boxes.shape[1], device=boxes.device)[None, :] < num[:, None]  # [B, T]
    return boxes * keep[..., None], labels * keep, num


def padding_mask(sizes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """sizes [B, 2] (h, w) -> mask [B, height, width] bool, True outside each image."""
    dev = sizes.device
    rows = torch.arange(height, device=dev)[None, :, None] >= sizes[:, 0, None, None]
    cols = torch.arange(width, device=dev)[None, None, :] >= sizes[:, 1, None, None]
    return rows | cols


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """A dense DALI TensorList -> a torch tensor on `device` (an asynchronous copy on the current stream)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    dense = tensor_list.as_tensor()
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    if out.numel():
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        feed_ndarray(dense, out, cuda_stream=stream)
    return out


# ------------------------------------------------------------------------------------------- loader

def _mix(*values: int) -> int:
    h = 0x2545F4914F6CDD1D
    for v in values:
        h = ((h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h % (2 ** 31 - 1)


class DaliLoader:
    """Iterable of Batch from a DALI pipeline over one split and one shard (rank of world_size).

    Train: every rank yields floor(floor(N / world_size) / batch_size) full batches per epoch (the same number on
    every rank, as DDP needs); the rest of the shard is read and dropped. Val: every image of the shard once, the
    last batch partial. `len(loader)` is that count. Batches live on cuda:device_id (CPU when device_id is None).
    """

    def __init__(self, cfg, split: str, dataset, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device_id: int | None = None, pinned: Pinned | None = None, num_threads: int | None = None):
        if not dali_available():
            raise RuntimeError(dali_missing_message())
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.cfg, self.split, self.dataset = cfg, split, dataset
        self.train = split == "train"
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.device_id, self.pinned = device_id, pinned
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self.batch_size = cfg.data.batch_size
        self.num_threads = max(1, num_threads if num_threads is not None else cfg.data.num_workers)
        coco = dataset.coco
        names = [coco.imgs[i]["file_name"] for i in dataset.ids]
        self.files, bad = scan_images(dataset.img_folder, names, threads=max(4, os.cpu_count() or 1))
        if bad:
            shown = "; ".join(f"{n} ({r})" for n, r in bad[:5])
            warnings.warn(f"{len(bad)} unreadable image(s) in {dataset.img_folder} left out of the DALI {split} "
                          f"pipeline: {shown}{' ...' if len(bad) > 5 else ''}", RuntimeWarning, stacklevel=2)
        self.num_bad = len(bad)
        n, s, b = len(self.files), world_size, self.batch_size
        if n == 0:
            raise ValueError(f"no readable images in {dataset.img_folder}")
        self.shard_len = (rank + 1) * n // s - rank * n // s
        self.iters = math.ceil(math.ceil(n / s) / b)  # reader iterations per epoch (DALI pads every shard alike)
        if self.train:
            self.steps = (n // s) // b
            if self.steps == 0:
                raise ValueError(f"{n} training images over {s} shard(s) give no full batch of {b}")
        else:
            self.steps = math.ceil(self.shard_len / b)
        self._pipe = None
        self._pipe_epoch = 0  # the epoch the pipeline delivers next (valid when _pos == 0)
        self._pos = 0  # reader iterations consumed in the current epoch
        self._requested: int | None = None

    @property
    def sampler(self):
        return self  # loader.sampler.set_epoch(epoch) works as with the torch loader

    def set_epoch(self, epoch: int) -> None:
        self._requested = int(epoch)

    def __len__(self) -> int:
        return self.steps

    def _build(self, epoch: int) -> None:
        self._pipe = None  # release the previous pipeline first
        self._pipe = build_pipeline(
            self.cfg.data, self.dataset.img_folder, self.dataset.ann_file, self.files, train=self.train,
            batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id, shard_id=self.rank,
            num_shards=self.world_size, shuffle_seed=_mix(self.seed, epoch), seed=_mix(self.seed, epoch, self.rank, 7),
            pinned=self.pinned)
        self._pipe_epoch, self._pos = epoch, 0

    def __iter__(self):
        epoch = self._pipe_epoch if self._requested is None else self._requested
        self._requested = None
        if self._pipe is None or self._pos != 0 or self._pipe_epoch != epoch:
            self._build(epoch)
        b = self.batch_size
        for i in range(self.iters):
            try:
                outs = self._pipe.run()
            except RuntimeError as exc:
                self._pipe = None
                raise RuntimeError(f"DALI pipeline failed ({self.split}): {exc}\nA file that passed the start/end "
                                   "marker check could not be decoded; remove it or use data.pipeline=torch, which "
                                   "skips unreadable images.") from exc
            self._pos = i + 1
            real = min(b, self.shard_len - i * b)
            if (self.train and i >= self.steps) or real <= 0:
                continue  # the rest of the shard (train) or a batch of padding repeats (val)
            yield self._batch(outs, real, first=i == 0)
        self._pipe_epoch, self._pos = epoch + 1, 0

    def _batch(self, outs, real: int, first: bool):
        from . import Batch

        images, sizes, orig_sizes, image_ids, boxes, labels = (_to_torch(o, self.device) for o in outs)
        if real < images.shape[0]:
            images, sizes, orig_sizes, image_ids, boxes, labels = (
                t[:real] for t in (images, sizes, orig_sizes, image_ids, boxes, labels))
        boxes, labels, num = compact_targets(boxes, labels)
        mask = padding_mask(sizes, images.shape[2], images.shape[3])
        skipped = self.num_bad if (first and self.rank == 0) else 0
        return Batch(images=images, mask=mask, targets={"labels": labels, "boxes": boxes, "num_targets": num},
                     image_ids=image_ids.reshape(-1).to(torch.int64), orig_sizes=orig_sizes, sizes=sizes,
                     skipped=skipped)


def dali_missing_message() -> str:
    return ("data.pipeline=dali needs NVIDIA DALI, which is not installed: install the wheel matching your CUDA "
            "version (e.g. `pip install nvidia-dali-cuda130`), or set data.pipeline=torch (or auto)")
