"""DETR's train and validation transforms on a PIL image and its boxes.

Every transform is a callable `t(image, target, generator=None) -> (image, target)`:
- image: PIL.Image (RGB) until `Normalize`, which turns it into a float tensor [3, H, W];
- target: dict with "boxes" [n, 4] float32 absolute (x0, y0, x1, y1) pixels and "labels" [n] int64 (plus any other
  keys, passed through); `Normalize` converts the boxes to (cx, cy, w, h) divided by the image size and sets "size";
- generator: a torch.Generator that every random choice draws from (None: torch's global RNG), so a transform
  chain is deterministic for a given seed.

Each random transform takes its choices as arguments, so a test can pin them: RandomHorizontalFlip(p=1.0) always
flips, RandomResize([s]) always resizes to s, RandomSelect(a, b, p=1.0) always takes a, and Crop(top, left, h, w)
is a fixed crop.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from detr_fast.ops.reference import box_xyxy_to_cxcywh

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Target = dict


def _rand(generator: torch.Generator | None) -> float:
    """One uniform draw in [0, 1)."""
    return float(torch.rand((), generator=generator))


def _randint(lo: int, hi: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [lo, hi] (both inclusive)."""
    return int(torch.randint(lo, hi + 1, (), generator=generator))


def resized_shape(h: int, w: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """(new_h, new_w) that resizes the short side to `size`, lowering `size` so that the long side stays <= max_size.

    The long side is truncated (int of the scaled length), the convention of DETR's reference transforms; the DALI
    pipeline computes the same numbers.
    """
    if max_size is not None:
        short, long = float(min(h, w)), float(max(h, w))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def crop_boxes(boxes: torch.Tensor, labels: torch.Tensor, top: int, left: int, height: int, width: int):
    """Shift boxes [n, 4] (x0, y0, x1, y1) into the crop window, clip them to it and drop those left without area.

    Returns (boxes [m, 4], labels [m], keep [n] bool).
    """
    shifted = boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)
    bound = torch.tensor([width, height, width, height], dtype=boxes.dtype)
    clipped = torch.minimum(shifted.clamp(min=0), bound)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped[keep], labels[keep], keep


class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, target: Target, generator: torch.Generator | None = None):
        for t in self.transforms:
            image, target = t(image, target, generator)
        return image, target

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class RandomHorizontalFlip:
    """Mirror the image left-right with probability p; x0' = W - x1, x1' = W - x0."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: Image.Image, target: Target, generator=None):
        if _rand(generator) >= self.p:
            return image, target
        w = image.width
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        target = dict(target)
        b = target["boxes"]
        target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResize:
    """Resize the short side to one of `sizes` (uniform choice), the long side kept <= max_size; boxes scale along.

    Bilinear (antialiased when shrinking, as PIL does).
    """

    def __init__(self, sizes: Sequence[int], max_size: int | None = None):
        if len(sizes) == 0:
            raise ValueError("RandomResize needs at least one size")
        self.sizes = [int(s) for s in sizes]
        self.max_size = max_size

    def __call__(self, image: Image.Image, target: Target, generator=None):
        size = self.sizes[_randint(0, len(self.sizes) - 1, generator)] if len(self.sizes) > 1 else self.sizes[0]
        return resize(image, target, size, self.max_size)

    def __repr__(self) -> str:
        return f"RandomResize(sizes={self.sizes}, max_size={self.max_size})"


def resize(image: Image.Image, target: Target, size: int, max_size: int | None = None):
    w, h = image.size
    nh, nw = resized_shape(h, w, size, max_size)
    if (nh, nw) == (h, w):
        return image, target
    image = image.resize((nw, nh), Image.Resampling.BILINEAR)
    target = dict(target)
    scale = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=torch.float32)
    target["boxes"] = target["boxes"] * scale
    return image, target


class Crop:
    """A fixed crop window (top, left, height, width) in pixels of the incoming image; boxes are clipped to it and
    those left without area are dropped together with their labels."""

    def __init__(self, top: int, left: int, height: int, width: int):
        self.region = (int(top), int(left), int(height), int(width))

    def __call__(self, image: Image.Image, target: Target, generator=None):
        return crop(image, target, *self.region)

    def __repr__(self) -> str:
        return f"Crop{self.region}"


def crop(image: Image.Image, target: Target, top: int, left: int, height: int, width: int):
    image = image.crop((left, top, left + width, top + height))
    target = dict(target)
    target["boxes"], target["labels"], _ = crop_boxes(target["boxes"], target["labels"], top, left, height, width)
    return image, target


class RandomSizeCrop:
    """Crop a window whose width and height are drawn uniformly in [min_size, max_size] (inclusive, both clamped to
    the image), at a uniform position."""

    def __init__(self, min_size: int, max_size: int):
        if min_size < 1 or max_size < min_size:
            raise ValueError(f"RandomSizeCrop needs 1 <= min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size = int(min_size), int(max_size)

    def params(self, h: int, w: int, generator=None) -> tuple[int, int, int, int]:
        """(top, left, height, width) of a random window in an image of h x w pixels."""
        cw = _randint(min(self.min_size, w), min(w, self.max_size), generator)
        ch = _randint(min(self.min_size, h), min(h, self.max_size), generator)
        top = _randint(0, h - ch, generator)
        left = _randint(0, w - cw, generator)
        return top, left, ch, cw

    def __call__(self, image: Image.Image, target: Target, generator=None):
        return crop(image, target, *self.params(image.height, image.width, generator))

    def __repr__(self) -> str:
        return f"RandomSizeCrop({self.min_size}, {self.max_size})"


class RandomSelect:
    """Apply `first` with probability p, otherwise `second`."""

    def __init__(self, first: Callable, second: Callable, p: float = 0.5):
        self.first, self.second, self.p = first, second, p

    def __call__(self, image, target: Target, generator=None):
        if _rand(generator) < self.p:
            return self.first(image, target, generator)
        return self.second(image, target, generator)

    def __repr__(self) -> str:
        return f"RandomSelect({self.first!r}, {self.second!r}, p={self.p})"


class Normalize:
    """PIL image -> float32 tensor [3, H, W] normalized with the ImageNet mean/std; boxes (x0, y0, x1, y1) pixels
    -> (cx, cy, w, h) divided by (W, H, W, H); sets target["size"] = (H, W)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        # (x / 255 - mean) / std as one multiply-add on the 0..255 values
        self._scale = 1.0 / (255.0 * self.std)
        self._shift = -self.mean / self.std

    def __call__(self, image: Image.Image, target: Target, generator=None):
        array = np.array(image.convert("RGB"), dtype=np.uint8)  # [H, W, 3], a writable copy
        tensor = torch.from_numpy(array).permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)
        tensor.mul_(self._scale).add_(self._shift)  # [3, H, W]
        h, w = tensor.shape[-2:]
        target = dict(target)
        cxcywh = box_xyxy_to_cxcywh(target["boxes"])  # [n, 4]
        target["boxes"] = (cxcywh / torch.tensor([w, h, w, h], dtype=torch.float32)).to(torch.float32)
        target["size"] = (int(h), int(w))
        return tensor, target


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)


def make_train_transforms(data_cfg) -> Compose:
    """DETR's training augmentation from cfg.data: flip; then with p = 1 - crop_prob (DETR: 0.5) the multi-scale
    resize, otherwise resize to one of crop_resize, random crop crop_min..crop_max, multi-scale resize; normalize."""
    return Compose([
        RandomHorizontalFlip(0.5),
        RandomSelect(
            RandomResize(data_cfg.scales, max_size=data_cfg.max_size),
            Compose([
                RandomResize(data_cfg.crop_resize),
                RandomSizeCrop(data_cfg.crop_min, data_cfg.crop_max),
                RandomResize(data_cfg.scales, max_size=data_cfg.max_size),
            ]),
            p=1.0 - data_cfg.crop_prob,
        ),
        Normalize(),
    ])


def make_val_transforms(data_cfg) -> Compose:
    """Resize the short side to val_size with the long side <= max_size; normalize. No randomness."""
    return Compose([RandomResize([data_cfg.val_size], max_size=data_cfg.max_size), Normalize()])


def make_transforms(data_cfg, split: str) -> Compose:
    if split == "train":
        return make_train_transforms(data_cfg)
    if split == "val":
        return make_val_transforms(data_cfg)
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
