"""COCO-format detection dataset (image folder + instances JSON read with pycocotools).

Items are (image [3, H, W] float32 normalized, target) with target keys
    boxes [n, 4] float32  (cx, cy, w, h) divided by the transformed image's (W, H, W, H)
    labels [n] int64      COCO category_id, as in the official DETR (the model needs num_classes > max id)
    image_id int, orig_size (h, w) of the file, size (h, w) after the transforms.
Crowd annotations (iscrowd=1) are dropped; images without annotations are kept with empty targets. An image that
cannot be read gives a warning and the item None, which `collate` drops and counts.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from PIL import Image

from .transforms import Compose

# (image folder, annotation file) under data.root for each dataset layout and split
_LAYOUT = {
    "coco": {"train": ("train2017", "annotations/instances_train2017.json"),
             "val": ("val2017", "annotations/instances_val2017.json")},
    "shapes": {"train": ("train", "annotations/instances_train.json"),
               "val": ("val", "annotations/instances_val.json")},
}


def dataset_paths(data_cfg, split: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of a split: the layout under data.root unless data.{split}_images /
    data.{split}_ann give explicit paths."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if data_cfg.dataset not in _LAYOUT:
        raise ValueError(f"data.dataset must be one of {tuple(_LAYOUT)}, got {data_cfg.dataset!r}")
    img_rel, ann_rel = _LAYOUT[data_cfg.dataset][split]
    root = Path(data_cfg.root)
    img = getattr(data_cfg, f"{split}_images") or root / img_rel
    ann = getattr(data_cfg, f"{split}_ann") or root / ann_rel
    return Path(img), Path(ann)


def check_paths(data_cfg, split: str) -> tuple[Path, Path]:
    """dataset_paths, raising FileNotFoundError with the config keys to fix when either is missing."""
    img, ann = dataset_paths(data_cfg, split)
    if not ann.is_file():
        raise FileNotFoundError(
            f"{split} annotation file not found: {ann} (set data.root to a folder with the "
            f"{data_cfg.dataset} layout, or data.{split}_ann to the instances JSON)")
    if not img.is_dir():
        raise FileNotFoundError(
            f"{split} image folder not found: {img} (set data.root to a folder with the "
            f"{data_cfg.dataset} layout, or data.{split}_images to the folder of JPEGs)")
    return img, ann


def load_coco(ann_file: Path):
    """pycocotools COCO object, its index messages silenced."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def max_category_id(coco) -> int:
    """Largest category id among the categories and the annotations (-1 when there are none)."""
    ids = [int(c) for c in coco.cats] + [int(a["category_id"]) for a in coco.anns.values()]
    return max(ids, default=-1)


def annotations_to_target(anns: list[dict], width: int, height: int) -> dict:
    """COCO annotations of one image -> boxes [n, 4] float32 absolute (x0, y0, x1, y1), clipped to the image, and
    labels [n] int64; crowd regions and boxes without area are dropped."""
    rows, labels = [], []
    for a in anns:
        if a.get("iscrowd", 0):
            continue
        x, y, w, h = (float(v) for v in a["bbox"])
        x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        if x1 > x0 and y1 > y0:
            rows.append((x0, y0, x1, y1))
            labels.append(int(a["category_id"]))
    boxes = torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)
    return {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64)}


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of dataset item `index` in `epoch`: a fixed function of its arguments, so the random
    crops and flips do not depend on the number of workers or on which worker loads the item."""
    mask = (1 << 63) - 1
    h = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & mask
    h ^= h >> 31
    h = (h * 0xD6E8FEB86659FD93) & mask
    return h ^ (h >> 29)


class CocoDetection(torch.utils.data.Dataset):
    """Detection dataset over an image folder and a COCO instances JSON.

    Indexing with an int draws the augmentation from torch's global RNG; indexing with (index, seed) (what
    `EpochSampler` yields) draws it from a generator seeded with `seed`, so a run is reproducible.
    """

    def __init__(self, img_folder, ann_file, transforms: Compose | None):
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"annotation file not found: {self.ann_file}")
        if not self.img_folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.img_folder}")
        self.coco = load_coco(self.ann_file)
        self.ids = sorted(self.coco.imgs.keys())
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        return self.img_folder / self.coco.imgs[self.ids[index]]["file_name"]

    def __getitem__(self, key):
        if isinstance(key, (tuple, list)):
            index, seed = int(key[0]), int(key[1])
            generator = torch.Generator().manual_seed(seed)
        else:
            index, generator = int(key), None
        image_id = self.ids[index]
        path = self.image_path(index)
        try:
            with Image.open(path) as f:
                image = f.convert("RGB")  # decodes the whole file here, so corrupt data raises now
        except Exception as exc:  # noqa: BLE001 - any decode failure skips the item, never ends the epoch
            warnings.warn(f"skipping unreadable image {path} (image_id {image_id}): {type(exc).__name__}: {exc}",
                          RuntimeWarning, stacklevel=2)
            return None
        w, h = image.size
        target = annotations_to_target(self.coco.imgToAnns.get(image_id, []), w, h)
        target["image_id"] = int(image_id)
        target["orig_size"] = (int(h), int(w))
        target["size"] = (int(h), int(w))
        if self.transforms is not None:
            image, target = self.transforms(image, target, generator)
        return image, target
