"""DETR transforms keep boxes consistent with the pixels: scenes of filled boxes in unique colors go through each
transform, and every output box must still frame its color (inside = the color, just outside = not it)."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from detr_fast.config import DataConfig
from detr_fast.data import transforms as T

BG = (128, 128, 128)
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]
# (x0, y0, x1, y1) in a 160 x 120 (w x h) scene; gaps of >= 8 px between boxes and to nothing else
BOXES = [(4, 6, 40, 50), (52, 10, 100, 44), (110, 4, 156, 60), (6, 64, 60, 116), (70, 70, 96, 112),
         (108, 72, 150, 110)]


def scene(boxes=BOXES, size=(160, 120)):
    img = Image.new("RGB", size, BG)
    arr = np.array(img)
    for (x0, y0, x1, y1), c in zip(boxes, COLORS):
        arr[y0:y1, x0:x1] = c
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.arange(len(boxes)) + 10,
              "image_id": 7, "orig_size": (size[1], size[0]), "size": (size[1], size[0])}
    return Image.fromarray(arr), target


def denormalize(t):
    mean = torch.tensor(T.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(T.IMAGENET_STD).view(3, 1, 1)
    return ((t * std + mean) * 255).permute(1, 2, 0).numpy()  # [H, W, 3]


def check_consistent(image, target, margin=2, tol=12.0):
    """image [3, H, W] normalized, target boxes normalized cxcywh: each box's inside holds its color, a ring just
    outside it does not (where the ring lies in the image)."""
    assert image.dtype == torch.float32 and image.dim() == 3 and image.shape[0] == 3
    h, w = image.shape[1:]
    assert target["size"] == (h, w)
    px = denormalize(image)
    boxes, labels = target["boxes"], target["labels"]
    assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
    assert boxes.shape == (labels.shape[0], 4)
    assert (boxes[:, 2:] > 0).all()
    xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1) * torch.tensor(
        [w, h, w, h])
    assert (xyxy >= -1e-3).all() and (xyxy[:, [0, 2]] <= w + 1e-3).all() and (xyxy[:, [1, 3]] <= h + 1e-3).all()
    for (x0, y0, x1, y1), label in zip(xyxy.tolist(), labels.tolist()):
        color = np.array(COLORS[label - 10], dtype=np.float32)
        ix0, iy0, ix1, iy1 = math.ceil(x0) + margin, math.ceil(y0) + margin, math.floor(x1) - margin, math.floor(
            y1) - margin
        if ix1 > ix0 and iy1 > iy0:
            inside = px[iy0:iy1, ix0:ix1]
            assert np.abs(inside - color).max() < tol, f"box of label {label} does not hold its color"
        # rings: the column/row `margin + 1` px outside each edge, over the box's middle
        ym, xm = slice(math.ceil(y0) + margin, math.floor(y1) - margin), slice(math.ceil(x0) + margin,
                                                                              math.floor(x1) - margin)
        for sl in ((ym, math.floor(x0) - margin - 1), (ym, math.ceil(x1) + margin),
                   (math.floor(y0) - margin - 1, xm), (math.ceil(y1) + margin, xm)):
            r, c = sl
            if isinstance(r, int) and not 0 <= r < h or isinstance(c, int) and not 0 <= c < w:
                continue
            ring = px[r, c].reshape(-1, 3)
            if len(ring):
                assert np.abs(ring - color).max(axis=1).min() > 60, f"box of label {label} is not tight"


def test_normalize_exact():
    img, target = scene()
    out, t = T.Normalize()(img, target)
    ref = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    mean = torch.tensor(T.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(T.IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(out, (ref - mean) / std)
    b = torch.tensor(BOXES, dtype=torch.float32)
    expect = torch.stack([(b[:, 0] + b[:, 2]) / 320, (b[:, 1] + b[:, 3]) / 240, (b[:, 2] - b[:, 0]) / 160,
                          (b[:, 3] - b[:, 1]) / 120], 1)
    torch.testing.assert_close(t["boxes"], expect)
    assert t["size"] == (120, 160)
    check_consistent(out, t, margin=0, tol=1.0)


def test_flip():
    img, target = scene()
    out, t = T.RandomHorizontalFlip(p=1.0)(img, target)
    assert np.array_equal(np.asarray(out), np.asarray(img)[:, ::-1])
    b = torch.tensor(BOXES, dtype=torch.float32)
    torch.testing.assert_close(t["boxes"], torch.stack([160 - b[:, 2], b[:, 1], 160 - b[:, 0], b[:, 3]], 1))
    torch.testing.assert_close(t["labels"], target["labels"])
    check_consistent(*T.Normalize()(out, t), margin=0, tol=1.0)
    same, t0 = T.RandomHorizontalFlip(p=0.0)(img, target)
    assert same is img and t0 is target


@pytest.mark.parametrize("size,max_size,expect", [(90, None, (90, 120)), (200, 250, (188, 250)),
                                                  (120, None, (120, 160)), (480, 1333, (480, 640))])
def test_resize(size, max_size, expect):
    img, target = scene()
    out, t = T.RandomResize([size], max_size=max_size)(img, target)
    assert (out.height, out.width) == expect
    sx, sy = expect[1] / 160, expect[0] / 120
    torch.testing.assert_close(t["boxes"], target["boxes"] * torch.tensor([sx, sy, sx, sy]))
    check_consistent(*T.Normalize()(out, t))


def test_resized_shape_rules():
    assert T.resized_shape(480, 640, 800, 1333) == (800, 1066)
    assert T.resized_shape(100, 1000, 800, 1333) == (133, 1330)  # short side lowered to keep the long side
    assert T.resized_shape(640, 480, 800, 1333) == (1066, 800)
    assert T.resized_shape(500, 500, 500, 1333) == (500, 500)
    assert T.resized_shape(333, 500, 400) == (400, 600)


def test_crop_drops_only_cropped_away_boxes():
    img, target = scene()
    # window x in [44, 134), y in [8, 68): box 0 (x1=40) is outside, box 3 (y0=64) is partly inside,
    # box 5 (y0=72) outside, box 4 (y0=70) outside; boxes 1, 2 partly or fully inside
    top, left, h, w = 8, 44, 60, 90
    out, t = T.Crop(top, left, h, w)(img, target)
    assert (out.height, out.width) == (h, w)
    assert np.array_equal(np.asarray(out), np.asarray(img)[top:top + h, left:left + w])
    kept = []
    for i, (x0, y0, x1, y1) in enumerate(BOXES):
        if min(x1, left + w) > max(x0, left) and min(y1, top + h) > max(y0, top):
            kept.append(i)
    assert kept == [1, 2, 3]
    assert t["labels"].tolist() == [10 + i for i in kept]
    b = torch.tensor([BOXES[i] for i in kept], dtype=torch.float32)
    expect = torch.stack([(b[:, 0] - left).clamp(0, w), (b[:, 1] - top).clamp(0, h), (b[:, 2] - left).clamp(0, w),
                          (b[:, 3] - top).clamp(0, h)], 1)
    torch.testing.assert_close(t["boxes"], expect)
    check_consistent(*T.Normalize()(out, t), margin=0, tol=1.0)


def test_crop_edge_touching_box_is_dropped():
    # a box whose right edge lies exactly on the window's left edge keeps zero width: dropped, the others stay
    boxes = torch.tensor([[0, 0, 20, 20], [20, 0, 30, 10], [25, 25, 50, 50]], dtype=torch.float32)
    labels = torch.tensor([3, 4, 5])
    out, lab, keep = T.crop_boxes(boxes, labels, 0, 20, 40, 40)
    assert keep.tolist() == [False, True, True]
    assert lab.tolist() == [4, 5]
    torch.testing.assert_close(out, torch.tensor([[0, 0, 10, 10], [5, 25, 30, 40]], dtype=torch.float32))


def test_random_size_crop_params_clamped():
    g = torch.Generator().manual_seed(0)
    crop = T.RandomSizeCrop(384, 600)
    for _ in range(200):
        top, left, ch, cw = crop.params(500, 450, g)
        assert 384 <= ch <= 500 and 384 <= cw <= 450
        assert 0 <= top <= 500 - ch and 0 <= left <= 450 - cw
    top, left, ch, cw = crop.params(100, 120, g)  # image smaller than min_size: the whole image
    assert (top, left, ch, cw) == (0, 0, 100, 120)


def small_cfg():
    return DataConfig(scales=[96, 112, 128, 144], max_size=200, crop_resize=[96, 112, 128], crop_min=70,
                      crop_max=120, val_size=128)


def test_pinned_chain_crop_branch():
    img, target = scene()
    chain = T.Compose([T.RandomHorizontalFlip(1.0),
                       T.RandomSelect(T.RandomResize([144], 200),
                                      T.Compose([T.RandomResize([112]), T.Crop(10, 20, 80, 110),
                                                 T.RandomResize([128], 200)]), p=0.0),
                       T.Normalize()])
    out, t = chain(img, target)
    # crop of a 112 x 149 image to 80 x 110, then short side 128: 128 x 176
    assert tuple(out.shape) == (3, 128, 176)
    check_consistent(out, t)


@pytest.mark.parametrize("seed", range(12))
def test_random_train_chain_consistent_and_deterministic(seed):
    img, target = scene()
    chain = T.make_train_transforms(small_cfg())
    out, t = chain(img, target, torch.Generator().manual_seed(seed))
    check_consistent(out, t)
    assert max(out.shape[1:]) <= 200
    out2, t2 = chain(img, target, torch.Generator().manual_seed(seed))
    assert torch.equal(out, out2) and torch.equal(t["boxes"], t2["boxes"]) and torch.equal(t["labels"],
                                                                                          t2["labels"])


def test_train_chain_varies_and_covers_both_branches():
    img, target = scene()
    chain = T.make_train_transforms(small_cfg())
    shapes, counts = set(), set()
    for seed in range(40):
        out, t = chain(img, target, torch.Generator().manual_seed(seed))
        shapes.add(tuple(out.shape))
        counts.add(len(t["labels"]))
    assert len(shapes) > 4  # several scales and crops
    assert len(counts) > 1  # some crops remove boxes


def test_val_chain():
    img, target = scene()
    out, t = T.make_val_transforms(small_cfg())(img, target)
    assert tuple(out.shape) == (3, 128, 170)
    check_consistent(out, t)


def test_empty_targets_pass_through():
    img, _ = scene(boxes=[])
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": 1,
              "orig_size": (120, 160), "size": (120, 160)}
    out, t = T.make_train_transforms(small_cfg())(img, target, torch.Generator().manual_seed(3))
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
    assert t["size"] == tuple(out.shape[1:])
