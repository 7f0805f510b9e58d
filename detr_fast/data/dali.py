"""NVIDIA DALI pipeline: COCO JPEGs to padded batches with DETR's augmentations, decoded and augmented on the GPU.

    loader = DaliLoader(cfg, "train", dataset, rank=r, world_size=R, seed=s, device_id=torch.cuda.current_device())
    loader.set_epoch(epoch)          # (also loader.sampler.set_epoch)
    for batch in loader: ...         # detr_fast.data.Batch, its tensors already on the GPU

Graph: fn.readers.coco (relative boxes, raw category ids, crowd dropped, sharded by rank, a new global permutation
each epoch) -> image shapes from the JPEG headers -> AugmentParams, one numpy call per batch (a python_function)
that draws the random choices of transforms.make_train_transforms with the same distributions (flip with p = 0.5;
with p = 0.5 the short side to a uniform choice of `scales`, long side <= max_size; otherwise the short side to a
choice of `crop_resize`, a crop whose width and height are uniform integers in [crop_min, crop_max] clamped to the
image, at a uniform integer position, then the short side to a choice of `scales`, long side <= max_size) and
computes the sizes with transforms.resized_shape itself -> decode (`mixed`: nvJPEG / hardware decoder on the GPU;
`cpu` when device_id is None) -> one resize of the region of the decoded image that DETR's resize / crop / resize
keeps (a single resampling: one pass and one blur fewer than the torch chain; the geometry is the same) ->
mirror + normalize (crop_mirror_normalize, CHW float32) -> pad to the batch's largest image. Validation: short
side val_size, long side <= max_size, no randomness.

The boxes travel raw (padded) with the per-sample geometry and are finished on the device in one batched step
(`finish_targets`): flipped, mapped into the crop window, clipped to it, written as normalized cxcywh; boxes left
without area are removed by a stable compaction, so T is the batch's largest box count before the crop (padding
rows, as always, hold zeros and lie beyond num_targets). Nothing is read back to the host per batch.

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

from detr_fast.ops.reference import box_xyxy_to_cxcywh

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

class AugmentParams:
    """The per-sample random choices and geometry of a batch, drawn with numpy in one call per batch (DALI runs it
    as a python_function; one vectorized call costs a few microseconds per image, where the same arithmetic as
    DALI graph operators costs over a hundred).

    Input: the batch's image shapes [H, W, C]. Outputs per sample: `args` float32 [7] = (h2, w2, roi_y0, roi_x0,
    roi_y1, roi_x1, flip) for the resize and mirror operators, and `meta` int64 [11] = (h2, w2, h0, w0, flip, h1,
    w1, top, left, ch, cw) for the boxes. (h0, w0) is the file's size; (h1, w1) the size after the crop branch's
    first resize (= h0, w0 in the plain branch); (top, left, ch, cw) the crop window in the flipped h1 x w1 image
    (the whole image in the plain branch); (h2, w2) the output size. Sizes come from transforms.resized_shape, so
    they equal the torch pipeline's exactly.
    """

    def __init__(self, data_cfg, train: bool, seed: int, pinned: Pinned | None = None):
        import numpy as np

        self.d, self.train = data_cfg, train
        self.pinned = pinned or Pinned()
        self.rng = np.random.default_rng(seed)

    def draw(self, h0, w0):
        """Choices for images of h0 x w0 (int arrays [B]) -> meta int64 [B, 11]."""
        import numpy as np

        from .transforms import resized_shape

        d, p, rng, b = self.d, self.pinned, self.rng, len(h0)
        if not self.train:
            hw2 = np.array([resized_shape(h, w, d.val_size, d.max_size) for h, w in zip(h0, w0)]).reshape(b, 2)
            zero = np.zeros(b, np.int64)
            return np.stack([hw2[:, 0], hw2[:, 1], h0, w0, zero, h0, w0, zero, zero, h0, w0], 1).astype(np.int64)
        flip = rng.random(b) < 0.5 if p.flip is None else np.full(b, bool(p.flip))
        # transforms.RandomSelect takes the plain resize when its draw is < 1 - crop_prob
        crop = (rng.random(b) >= 1.0 - d.crop_prob if p.crop_branch is None
                else np.full(b, bool(p.crop_branch)))
        r = rng.choice(d.crop_resize, b) if p.crop_resize is None else np.full(b, p.crop_resize)
        s = rng.choice(d.scales, b) if p.scale is None else np.full(b, p.scale)
        hw1 = np.array([resized_shape(h, w, int(ri)) for h, w, ri in zip(h0, w0, r)]).reshape(b, 2)
        h1, w1 = np.where(crop, hw1[:, 0], h0), np.where(crop, hw1[:, 1], w0)
        if p.crop is not None:
            top, left, ch, cw = (np.full(b, int(v)) for v in p.crop)
        else:
            cw = rng.integers(np.minimum(w1, d.crop_min), np.minimum(w1, d.crop_max) + 1)
            ch = rng.integers(np.minimum(h1, d.crop_min), np.minimum(h1, d.crop_max) + 1)
            top, left = rng.integers(0, h1 - ch + 1), rng.integers(0, w1 - cw + 1)
        top, left = np.where(crop, top, 0), np.where(crop, left, 0)
        ch, cw = np.where(crop, ch, h1), np.where(crop, cw, w1)
        hw2 = np.array([resized_shape(int(h), int(w), int(si), d.max_size) for h, w, si in zip(ch, cw, s)])
        hw2 = hw2.reshape(b, 2)
        return np.stack([hw2[:, 0], hw2[:, 1], h0, w0, flip, h1, w1, top, left, ch, cw], 1).astype(np.int64)

    def __call__(self, shapes):
        import numpy as np

        hw = np.stack(shapes).astype(np.int64)[:, :2]  # [B, 2]
        meta = self.draw(hw[:, 0], hw[:, 1])
        h2, w2, h0, w0, flip, h1, w1, top, left, ch, cw = meta.T.astype(np.float64)
        # the window lies in the flipped h1 x w1 image; in the unflipped one it starts at w1 - left - cw. Its
        # corners in the decoded image's pixels (scale w0 / w1) form the region resampled to h2 x w2.
        src_left = np.where(flip > 0, w1 - left - cw, left)
        sy, sx = h0 / h1, w0 / w1
        args = np.stack([h2, w2, top * sy, src_left * sx, (top + ch) * sy, (src_left + cw) * sx, flip], 1)
        return list(args.astype(np.float32)), list(meta)


def build_pipeline(data_cfg, img_dir, ann_file, files: list[str], *, train: bool, batch_size: int, num_threads: int,
                   device_id: int | None, shard_id: int = 0, num_shards: int = 1, shuffle_seed: int = 0,
                   seed: int = 0, pinned: Pinned | None = None, prefetch: int = 2):
    """The DALI pipeline (built). Outputs per sample, all on the GPU when device_id is set:
    images [3, Hmax, Wmax] float32 (normalized, padded), meta [11] int64 (AugmentParams), image_ids [1] int32,
    boxes [Tmax, 4] float32 relative (x0, y0, x1, y1) of the file, labels [Tmax] int32 (category ids); Tmax = the
    batch's largest box count, padding rows zero. `finish_targets` turns boxes + meta into the targets."""
    from nvidia.dali import fn, pipeline_def, types

    mixed = device_id is not None
    params = AugmentParams(data_cfg, train, seed, pinned)
    if train:  # a new global permutation each epoch, cut into fixed shards
        order = {"shuffle_after_epoch": True, "shuffle_after_epoch_seed": shuffle_seed}
    else:  # each pipeline keeps its shard
        order = {"stick_to_shard": True}

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=prefetch)
    def pipe():
        encoded, boxes, labels, image_ids = fn.readers.coco(
            file_root=str(img_dir), annotations_file=str(ann_file), images=files, ltrb=True, ratio=True,
            image_ids=True, avoid_class_remapping=True, include_iscrowd=False, skip_empty=False,
            size_threshold=1e-6, shard_id=shard_id, num_shards=num_shards, pad_last_batch=True, name="reader",
            **order)
        # adjust_orientation=False on the shape and the decoder: the stored pixel grid, as PIL gives it to the torch
        # pipeline and as COCO's boxes are drawn (an EXIF-rotated decode would put the boxes in another frame)
        shape = fn.peek_image_shape(encoded, adjust_orientation=False)  # [H, W, C] int64, from the header
        args, meta = fn.python_function(shape, function=params, batch_processing=True, num_outputs=2)
        images = fn.decoders.image(encoded, device="mixed" if mixed else "cpu", output_type=types.RGB,
                                   adjust_orientation=False)
        images = fn.resize(images, size=args[0:2], roi_start=args[2:4], roi_end=args[4:6], roi_relative=False,
                           interp_type=types.INTERP_LINEAR, antialias=True)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=[255.0 * m for m in IMAGENET_MEAN],
                                          std=[255.0 * s for s in IMAGENET_STD],
                                          mirror=fn.cast(args[6], dtype=types.INT32))
        images = fn.pad(images, axes=(1, 2), fill_value=0.0)
        boxes = fn.pad(boxes, axes=(0,), fill_value=0.0)
        labels = fn.pad(fn.reshape(labels, shape=[-1]), axes=(0,), fill_value=0)
        outs = (images, meta, image_ids, boxes, labels)
        if mixed:
            outs = tuple(o if o.device == "gpu" else o.gpu() for o in outs)
        return outs

    p = pipe()
    p.build()
    return p


# ------------------------------------------------------------------------------------------- device-side assembly

def finish_targets(boxes: torch.Tensor, labels: torch.Tensor, meta: torch.Tensor):
    """The pipeline's raw boxes -> DETR targets, batched on the tensors' device (no read-back to the host).

    boxes [B, T, 4] relative (x0, y0, x1, y1) of each file (padding rows zero), labels [B, T], meta [B, 11]
    (AugmentParams) -> (boxes [B, T, 4] cxcywh normalized to the output image, labels [B, T] int64,
    num_targets [B] int64): flipped, mapped into the crop window, clipped to it; those left without area are
    dropped (the others moved to the front in their order, the rest zeroed).
    """
    m = meta.to(boxes.dtype)
    flip = meta[:, 4, None] > 0  # [B, 1]
    h1, w1, top, left, ch, cw = (m[:, k, None] for k in range(5, 11))  # each [B, 1]
    b = boxes.clamp(0.0, 1.0)
    x0, y0, x1, y1 = b.unbind(-1)  # each [B, T]
    x0, x1 = torch.where(flip, 1.0 - x1, x0), torch.where(flip, 1.0 - x0, x1)
    x0 = ((x0 * w1 - left) / cw).clamp(0.0, 1.0)
    x1 = ((x1 * w1 - left) / cw).clamp(0.0, 1.0)
    y0 = ((y0 * h1 - top) / ch).clamp(0.0, 1.0)
    y1 = ((y1 * h1 - top) / ch).clamp(0.0, 1.0)
    cxcywh = box_xyxy_to_cxcywh(torch.stack((x0, y0, x1, y1), -1))  # [B, T, 4]
    return compact_targets(cxcywh, labels)


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
        # GPU pipelines return their outputs bound to torch's current stream (the dynamic executor's asynchronous
        # outputs): the copies into torch tensors queue behind DALI's work without the host waiting for it.
        # DETR_FAST_DALI_SYNC_OUTPUTS=1 asks for host-synchronous outputs instead (DALI's default; for comparison).
        async_out = os.environ.get("DETR_FAST_DALI_SYNC_OUTPUTS", "0") != "1"
        stream = torch.cuda.current_stream(self.device) \
            if async_out and self.device.type == "cuda" and self._pipe.exec_dynamic else None
        for i in range(self.iters):
            try:
                outs = self._pipe.run(stream) if stream is not None else self._pipe.run()
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

        images, meta, image_ids, boxes, labels = (_to_torch(o, self.device) for o in outs)
        if real < images.shape[0]:
            images, meta, image_ids, boxes, labels = (t[:real] for t in (images, meta, image_ids, boxes, labels))
        boxes, labels, num = finish_targets(boxes, labels, meta)
        sizes = meta[:, 0:2]
        mask = padding_mask(sizes, images.shape[2], images.shape[3])
        skipped = self.num_bad if (first and self.rank == 0) else 0
        return Batch(images=images, mask=mask, targets={"labels": labels, "boxes": boxes, "num_targets": num},
                     image_ids=image_ids.reshape(-1).to(torch.int64), orig_sizes=meta[:, 2:4], sizes=sizes,
                     skipped=skipped)


def dali_missing_message() -> str:
    return ("data.pipeline=dali needs NVIDIA DALI, which is not installed: install the wheel matching your CUDA "
            "version (e.g. `pip install nvidia-dali-cuda130`), or set data.pipeline=torch (or auto)")
