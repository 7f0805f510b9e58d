"""Data: COCO-format datasets, DETR's transforms, padded batches and the loaders that feed the engine.

    ensure_dataset(cfg)                     # shapes: generate cfg.data.root if missing; coco: check the paths
    loader = build_loader(cfg, "train", distributed=..., rank=..., world_size=...)
    for epoch in range(start_epoch, epochs):
        loader.sampler.set_epoch(epoch)     # the epoch's shuffle and augmentation seeds follow (seed, epoch)
        for batch in loader:                # Batch, see below
            batch = batch.to(device, non_blocking=True)

A Batch holds images [B, 3, H, W] float32 zero-padded at the bottom/right, mask [B, H, W] bool (True = padding),
padded targets {"labels": [B, T] int64, "boxes": [B, T, 4] float32 cxcywh normalized to each image's unpadded
size, "num_targets": [B] int64} (rows t >= num_targets[b] hold zeros), image_ids [B], orig_sizes [B, 2] and
sizes [B, 2] (h, w; int64), and `skipped`, the number of unreadable images dropped from it.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

from .coco import CocoDetection, check_paths, dataset_paths, item_seed, max_category_id
from .synthetic import PARAMS_FILE, make_shapes, shapes_params
from .transforms import make_transforms

__all__ = ["Batch", "collate", "pad_batch", "build_dataset", "build_loader", "ensure_dataset", "make_shapes",
           "EpochSampler", "resolve_pipeline", "dataset_paths", "CocoDetection"]


@dataclass
class Batch:
    """A padded batch. Shapes: images [B, 3, H, W] float32, mask [B, H, W] bool (True = padding), targets
    {"labels": [B, T] int64, "boxes": [B, T, 4] float32, "num_targets": [B] int64}, image_ids [B] int64,
    orig_sizes [B, 2] int64 (h, w of the file), sizes [B, 2] int64 (h, w after the transforms), skipped: int."""

    images: torch.Tensor
    mask: torch.Tensor
    targets: dict
    image_ids: torch.Tensor
    orig_sizes: torch.Tensor
    sizes: torch.Tensor
    skipped: int = 0

    def _map(self, fn) -> "Batch":
        return Batch(images=fn(self.images), mask=fn(self.mask), targets={k: fn(v) for k, v in self.targets.items()},
                     image_ids=fn(self.image_ids), orig_sizes=fn(self.orig_sizes), sizes=fn(self.sizes),
                     skipped=self.skipped)

    def _tensors(self) -> list:
        """Every tensor of the batch."""
        return [self.images, self.mask, *self.targets.values(), self.image_ids, self.orig_sizes, self.sizes]

    def to(self, device, non_blocking: bool = True) -> "Batch":
        """The batch with every tensor on `device`. Copies to a GPU are asynchronous when non_blocking (from pinned
        memory); copies to the CPU are complete when this returns, whatever non_blocking says."""
        device = torch.device(device)
        moved = self._map(lambda t: t.to(device, non_blocking=non_blocking))
        if non_blocking and device.type == "cpu":
            # A CUDA -> CPU .to(non_blocking=True) returns a tensor in newly pinned host memory while the copy is
            # still queued on the source device's current stream (torch pins the output and does not wait). Read
            # at once, it shows zeros or an old pinned block's contents: values that look like wrong geometry
            # (sizes (0, 0), another image's size, a mask that disagrees with the sizes). So wait here, once per
            # source device, after queueing every copy. A host-side read needs this sync anyway.
            for dev in {t.device for t in self._tensors() if t.is_cuda}:
                torch.cuda.current_stream(dev).synchronize()
        return moved

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pinning thread when pin_memory=True."""
        return self._map(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return self.images.shape[0]


def pad_batch(batch, buckets=(), max_targets: int = 0):
    """The batch (a Batch or any dataclass with images [B, 3, H, W], mask [B, H, W] and targets {"labels" [B, T],
    "boxes" [B, T, 4], ...}) with fixed shapes, on whatever device it is: H and W each padded up to the smallest of
    `buckets` that holds them (padding masked, as DETR's own padding), targets padded to `max_targets` rows (zeros
    beyond num_targets). Fixed shapes let a CUDA graph or a compiled model be reused across batches. Uses only
    shapes, never tensor values (no device sync). ValueError when the images exceed every bucket or the batch holds
    more target rows than max_targets."""
    B, _, H, W = batch.images.shape
    H2, W2 = (_bucket(H, buckets, "height"), _bucket(W, buckets, "width")) if buckets else (H, W)
    T = batch.targets["labels"].shape[1]
    T2 = max_targets or T
    if T > T2:
        raise ValueError(f"a batch holds {T} target rows, more than data.max_targets={T2}; raise it")
    if (H2, W2, T2) == (H, W, T):
        return batch
    F = torch.nn.functional
    targets = dict(batch.targets)
    targets["labels"] = F.pad(batch.targets["labels"], (0, T2 - T))
    targets["boxes"] = F.pad(batch.targets["boxes"], (0, 0, 0, T2 - T))
    return dataclasses.replace(batch, images=F.pad(batch.images, (0, W2 - W, 0, H2 - H)),
                               mask=F.pad(batch.mask, (0, W2 - W, 0, H2 - H), value=True), targets=targets)


def _bucket(n: int, buckets, what: str) -> int:
    fits = [b for b in buckets if b >= n]
    if not fits:
        raise ValueError(f"image {what} {n} exceeds every size in data.pad_to {sorted(buckets)}; add a larger one")
    return min(fits)


def collate(items: list) -> Batch:
    """[(image [3, h_i, w_i], target), ... or None] -> Batch padded to the largest image and target count.

    None items (unreadable images) are dropped and counted in Batch.skipped; if all are None the batch has B = 0.
    """
    kept = [it for it in items if it is not None]
    skipped = len(items) - len(kept)
    b = len(kept)
    hmax = max((img.shape[1] for img, _ in kept), default=0)
    wmax = max((img.shape[2] for img, _ in kept), default=0)
    tmax = max((t["labels"].shape[0] for _, t in kept), default=0)
    images = torch.zeros(b, 3, hmax, wmax, dtype=torch.float32)
    mask = torch.ones(b, hmax, wmax, dtype=torch.bool)
    labels = torch.zeros(b, tmax, dtype=torch.int64)
    boxes = torch.zeros(b, tmax, 4, dtype=torch.float32)
    num_targets = torch.zeros(b, dtype=torch.int64)
    image_ids = torch.zeros(b, dtype=torch.int64)
    orig_sizes = torch.zeros(b, 2, dtype=torch.int64)
    sizes = torch.zeros(b, 2, dtype=torch.int64)
    for i, (img, t) in enumerate(kept):
        h, w = img.shape[1:]
        images[i, :, :h, :w] = img
        mask[i, :h, :w] = False
        n = t["labels"].shape[0]
        labels[i, :n] = t["labels"]
        boxes[i, :n] = t["boxes"]
        num_targets[i] = n
        image_ids[i] = int(t["image_id"])
        orig_sizes[i] = torch.tensor(t["orig_size"])
        sizes[i] = torch.tensor((h, w))
    return Batch(images=images, mask=mask, targets={"labels": labels, "boxes": boxes, "num_targets": num_targets},
                 image_ids=image_ids, orig_sizes=orig_sizes, sizes=sizes, skipped=skipped)


class EpochSampler(DistributedSampler):
    """A DistributedSampler (also used with one replica) whose order and augmentation depend only on (seed, epoch).

    shuffle=True (train): a permutation drawn from seed + epoch, padded by repeating its start to a multiple of
    num_replicas (every rank gets the same number of items, as DDP needs), rank r taking positions r, r + R, ...;
    each item is yielded as (index, augmentation seed). shuffle=False (val): the indices in order, rank r taking
    r, r + R, ... with no padding, so the shards are disjoint and cover the set exactly once. Call
    set_epoch(epoch) before each epoch.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        n = len(dataset)
        if shuffle:
            self.num_samples = math.ceil(n / num_replicas)
        else:
            self.num_samples = len(range(rank, n, num_replicas))
        self.total_size = self.num_samples * num_replicas

    def indices(self) -> list[int]:
        n = len(self.dataset)
        if not self.shuffle:
            return list(range(self.rank, n, self.num_replicas))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=g).tolist()  # sync: none, a CPU generator and tensor
        total = math.ceil(n / self.num_replicas) * self.num_replicas
        while len(order) < total and n > 0:
            order += order[: total - len(order)]
        return order[self.rank:total:self.num_replicas]

    def __iter__(self):
        if not self.shuffle:
            return iter(self.indices())
        return iter([(i, item_seed(self.seed, self.epoch, i)) for i in self.indices()])

    def __len__(self) -> int:
        return self.num_samples


def build_dataset(cfg, split: str) -> CocoDetection:
    """The dataset of `split` ("train" | "val") with its transforms. Raises FileNotFoundError for a missing image
    folder or annotation file and ValueError when model.num_classes does not exceed the largest category id."""
    img_dir, ann_file = check_paths(cfg.data, split)
    dataset = CocoDetection(img_dir, ann_file, make_transforms(cfg.data, split))
    top = max_category_id(dataset.coco)
    if cfg.model.num_classes <= top:
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes} but {ann_file} uses category ids up to {top}: labels are "
            f"the raw category ids, so model.num_classes must be at least {top + 1}")
    return dataset


def ensure_dataset(cfg) -> None:
    """Make sure the configured dataset exists before training: for data.dataset "shapes", generate it at data.root
    when that folder does not exist yet (data.shapes_* parameters); then check both splits' paths
    (FileNotFoundError with the keys to fix)."""
    d = cfg.data
    explicit = any((d.train_images, d.train_ann, d.val_images, d.val_ann))
    if d.dataset == "shapes" and not explicit:
        root = Path(d.root)
        if not root.exists():
            print(f"generating the shapes dataset at {root} ({d.shapes_train} train + {d.shapes_val} val images of "
                  f"{d.shapes_image_size} px, {cfg.model.num_classes} classes, seed {d.shapes_seed})", flush=True)
            make_shapes(root, num_train=d.shapes_train, num_val=d.shapes_val, image_size=d.shapes_image_size,
                        seed=d.shapes_seed, num_classes=cfg.model.num_classes, replace=False)
        else:
            _check_shapes_set(root, shapes_params(d.shapes_train, d.shapes_val, d.shapes_image_size, d.shapes_seed,
                                                  cfg.model.num_classes))
    for split in ("train", "val"):
        check_paths(d, split)


def _check_shapes_set(root: Path, wanted: dict) -> None:
    """An existing shapes folder must be the set the config describes: compare its shapes.json (or, for a set
    without one, its image counts) with the data.shapes_* values. Never deletes anything: a mismatch is an error
    that says how to fix it."""
    params_file = root / PARAMS_FILE
    if params_file.is_file():
        try:
            have = json.loads(params_file.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{params_file} is unreadable ({exc}); remove {root} to have it generated again") from exc
        diff = {k: (have.get(k), v) for k, v in wanted.items() if have.get(k) != v}
    else:
        diff = {}
        for split, key in (("train", "num_train"), ("val", "num_val")):
            ann = root / "annotations" / f"instances_{split}.json"
            if ann.is_file():
                try:
                    n = len(json.loads(ann.read_text()).get("images", []))
                except (OSError, ValueError):
                    continue  # check_paths / the dataset report unreadable files
                if n != wanted[key]:
                    diff[key] = (n, wanted[key])
    if diff:
        what = ", ".join(f"{k} {a} (config: {b})" for k, (a, b) in diff.items())
        raise ValueError(f"the shapes set at {root} does not match the config: {what}. Remove {root} to have it "
                         "generated again, or set data.root to another folder")


def dali_available() -> bool:
    from .dali import dali_available as available

    return available()


def use_cuda(cfg) -> bool:
    """Whether training runs on a CUDA device (train.device auto|cuda with a GPU present)."""
    return cfg.train.device != "cpu" and torch.cuda.is_available()


def resolve_pipeline(cfg) -> str:
    """"torch" or "dali" for data.pipeline. auto: dali where training runs on a GPU and DALI is installed, else torch.
    dali: DALI (a clear RuntimeError when it is not installed); without a GPU it runs DALI's CPU operators."""
    choice = cfg.data.pipeline
    if choice == "auto":
        return "dali" if use_cuda(cfg) and dali_available() else "torch"
    if choice == "dali":
        if not dali_available():
            from .dali import dali_missing_message

            raise RuntimeError(dali_missing_message())
        return "dali"
    return "torch"


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # each worker handles one item at a time; more threads only contend for the cores


class DetrLoader(DataLoader):
    """DataLoader yielding Batch; a batch left empty by unreadable images is not yielded, its count carried into
    the next batch's `skipped`."""

    def __iter__(self):
        carry = 0
        for batch in super().__iter__():
            if len(batch) == 0:
                carry += batch.skipped
                continue
            if carry:
                batch = dataclasses.replace(batch, skipped=batch.skipped + carry)
                carry = 0
            yield batch


def build_loader(cfg, split: str, distributed: bool = False, rank: int = 0, world_size: int = 1,
                 epoch_seed: int | None = None):
    """A loader over `split` yielding Batch. Train: shuffled per epoch, the last partial batch dropped; val: in order.

    data.pipeline (resolve_pipeline) picks the torch DataLoader described here or the DALI pipeline
    (dali.DaliLoader: same Batch, already on the GPU, same set_epoch call; data.num_workers = its CPU threads).

    The sampler is an EpochSampler (a DistributedSampler) with `world_size` replicas when `distributed`, one
    otherwise; the engine calls `loader.sampler.set_epoch(epoch)` before each epoch, and the shuffle and the
    augmentation then depend only on (epoch_seed, epoch) (epoch_seed defaults to cfg.train.seed), so a resumed run
    sees the same data as an uninterrupted one. Workers persist across epochs when data.num_workers > 0; batches
    are pinned when CUDA is available and the training device is not the CPU.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not distributed:
        rank, world_size = 0, 1
    seed = cfg.train.seed if epoch_seed is None else int(epoch_seed)
    pipeline = resolve_pipeline(cfg)
    dataset = build_dataset(cfg, split)
    train = split == "train"
    if pipeline == "dali":
        from .dali import DaliLoader

        device_id = torch.cuda.current_device() if use_cuda(cfg) else None
        return DaliLoader(cfg, split, dataset, rank=rank, world_size=world_size, seed=seed, device_id=device_id)
    sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed)
    workers = cfg.data.num_workers
    pin = use_cuda(cfg)
    return DetrLoader(dataset, batch_size=cfg.data.batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, pin_memory=pin, drop_last=train, persistent_workers=workers > 0,
                      worker_init_fn=_worker_init if workers > 0 else None,
                      prefetch_factor=4 if workers > 0 else None)
