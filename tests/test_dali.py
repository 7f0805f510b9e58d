"""The DALI pipeline: batch structure, agreement with the torch pipeline on pinned random choices, box/label
consistency under random augmentation, empty images, corrupt files, sharding. DALI's CPU operators run everywhere
(device_id=None); the same tests run the `mixed` (GPU decode) path where a GPU is present."""
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from helpers import cpu_and_cuda  # noqa: E402
from test_data_transforms import COLORS, check_consistent  # noqa: E402

from detr_fast.config import load_config  # noqa: E402
from detr_fast.data import Batch, build_dataset, build_loader, make_shapes, transforms as T  # noqa: E402
from detr_fast.data.dali import DaliLoader, Pinned, compact_targets, scan_images  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shapes.yaml"


def device_id(device):
    return 0 if device == "cuda" else None


def write_color_set(root: Path, n: int = 12, seed: int = 0):
    """A COCO set of scenes holding up to 6 filled boxes, box i colored COLORS[i] with category id 10 + i, on gray;
    landscape 160 x 120 and portrait 120 x 160 images; image 3 has no annotation, image 5 a crowd box."""
    rng = np.random.default_rng(seed)
    (root / "val").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for k in range(n):
        w, h = (160, 120) if k % 3 else (120, 160)
        arr = np.full((h, w, 3), 128, np.uint8)
        boxes = []
        if k != 3:
            # a 3 x 2 grid of cells of w/3 x h/2; each box lies in its own cell with a gap to the cell border
            for i in range(6):
                if rng.random() < 0.2:
                    continue
                cx0, cy0 = (i % 3) * w // 3, (i // 3) * h // 2
                cw, ch = w // 3, h // 2
                bw, bh = int(rng.integers(12, cw - 8)), int(rng.integers(12, ch - 8))
                x0 = cx0 + 4 + int(rng.integers(0, cw - 8 - bw + 1))
                y0 = cy0 + 4 + int(rng.integers(0, ch - 8 - bh + 1))
                arr[y0:y0 + bh, x0:x0 + bw] = COLORS[i]
                boxes.append((i, [x0, y0, bw, bh]))
        name = f"{k + 1:06d}.jpg"
        Image.fromarray(arr).save(root / "val" / name, quality=95, subsampling=0)
        images.append({"id": k + 1, "file_name": name, "width": w, "height": h})
        for i, bbox in boxes:
            anns.append({"id": len(anns) + 1, "image_id": k + 1, "category_id": 10 + i, "bbox": bbox,
                         "area": bbox[2] * bbox[3], "iscrowd": 0})
        if k == 5:
            anns.append({"id": len(anns) + 1, "image_id": k + 1, "category_id": 12, "bbox": [1, 1, 30, 30],
                         "area": 900, "iscrowd": 1})
    cats = [{"id": c, "name": f"c{c}"} for c in range(10, 16)]
    doc = {"images": images, "annotations": anns, "categories": cats}
    (root / "annotations" / "instances_val.json").write_text(json.dumps(doc))
    return doc


def color_cfg(root, *extra):
    ann = root / "annotations" / "instances_val.json"
    return load_config(CONFIG, [f"data.val_images={root / 'val'}", f"data.val_ann={ann}",
                                f"data.train_images={root / 'val'}", f"data.train_ann={ann}",
                                "model.num_classes=16", "data.batch_size=4", "data.num_workers=1",
                                "data.scales=[96, 112, 128, 144]", "data.max_size=200",
                                "data.crop_resize=[96, 112, 128]", "data.crop_min=70", "data.crop_max=120",
                                "data.val_size=128", "data.crop_prob=0.5", "train.device=cpu", *extra])


@pytest.fixture(scope="module")
def color_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("colors")
    write_color_set(root)
    return root


def add_items(b: Batch, out: dict) -> None:
    """Add a CPU batch's images to out: {image_id: (image [3, h, w], boxes [n, 4] cxcywh, labels [n], size (h, w),
    orig (h, w))}."""
    for i in range(len(b)):
        h, w = b.sizes[i].tolist()
        n = int(b.targets["num_targets"][i])
        out[int(b.image_ids[i])] = (b.images[i, :, :h, :w], b.targets["boxes"][i, :n], b.targets["labels"][i, :n],
                                    (h, w), tuple(b.orig_sizes[i].tolist()))


def dali_items(loader):
    """{image_id: (image [3, h, w] cpu, boxes [n, 4] cxcywh, labels [n], size (h, w), orig (h, w))}"""
    out = {}
    for batch in loader:
        assert isinstance(batch, Batch)
        add_items(batch.to("cpu"), out)  # complete on return (Batch.to waits for device -> host copies)
    return out


def torch_items(ds):
    """{image_id: (image, target)} of the torch dataset."""
    ref = {}
    for i in range(len(ds)):
        img, t = ds[i]
        ref[t["image_id"]] = (img, t)
    return ref


def to_xyxy(boxes, h, w):
    c = boxes * torch.tensor([w, h, w, h])
    return torch.cat([c[:, :2] - c[:, 2:] / 2, c[:, :2] + c[:, 2:] / 2], 1)


# ---------------------------------------------------------------------------------------------- structure

@pytest.mark.parametrize("device", cpu_and_cuda())
def test_batch_structure(color_root, device):
    cfg = color_cfg(color_root)
    ds = build_dataset(cfg, "train")
    loader = DaliLoader(cfg, "train", ds, seed=0, device_id=device_id(device))
    assert len(loader) == 3  # 12 images, batch 4
    batches = list(loader)
    assert len(batches) == 3
    for b in batches:
        assert b.images.device.type == device and b.images.dtype == torch.float32 and b.images.dim() == 4
        B, _, H, W = b.images.shape
        assert B == 4 and b.images.shape[1] == 3
        assert b.mask.shape == (B, H, W) and b.mask.dtype == torch.bool
        t = b.targets
        assert t["labels"].dtype == torch.int64 and t["boxes"].dtype == torch.float32
        assert t["num_targets"].dtype == torch.int64 and t["num_targets"].shape == (B,)
        T_ = t["labels"].shape[1]
        assert t["boxes"].shape == (B, T_, 4)
        for x in (b.image_ids, b.orig_sizes, b.sizes):
            assert x.dtype == torch.int64 and x.device.type == device
        assert b.image_ids.shape == (B,) and b.sizes.shape == (B, 2) and b.orig_sizes.shape == (B, 2)
        assert isinstance(b.skipped, int) and b.skipped == 0
        b = b.to("cpu")
        for i in range(B):
            h, w = b.sizes[i].tolist()
            assert max(h, w) <= 200 and h <= H and w <= W
            assert not b.mask[i, :h, :w].any() and b.mask[i, h:].all() and b.mask[i, :, w:].all()
            assert (b.images[i, :, h:] == 0).all() and (b.images[i, :, :, w:] == 0).all()
            n = int(b.targets["num_targets"][i])
            assert (b.targets["boxes"][i, n:] == 0).all() and (b.targets["labels"][i, n:] == 0).all()
            assert (b.targets["boxes"][i, :n, 2:] > 0).all()
            assert set(b.targets["labels"][i, :n].tolist()) <= set(range(10, 16))
            assert b.orig_sizes[i].tolist() in ([120, 160], [160, 120])


def test_compact_targets():
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.0, 0.3], [0.3, 0.3, 0.1, 0.1]],
                          [[0.2, 0.2, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    labels = torch.tensor([[3, 4, 5], [6, 0, 0]], dtype=torch.int32)
    b, lab, num = compact_targets(boxes, labels)
    assert num.tolist() == [2, 0] and lab.dtype == torch.int64
    assert lab.tolist() == [[3, 5, 0], [0, 0, 0]]
    torch.testing.assert_close(b[0, :2], boxes[0, [0, 2]])
    assert (b[0, 2:] == 0).all() and (b[1] == 0).all()


# ---------------------------------------------------------------------------------------------- graph arithmetic

def test_augment_params_bounds_and_windows():
    """AugmentParams: sizes from transforms.resized_shape, windows inside the image, both branches, both flips."""
    from detr_fast.data.dali import AugmentParams

    cfg = color_cfg(Path("unused"))
    params = AugmentParams(cfg.data, train=True, seed=0)
    rng = np.random.default_rng(1)
    shapes = [np.array([h, w, 3]) for h, w in rng.integers(60, 400, (256, 2))]
    args, meta = params(shapes)
    meta = np.stack(meta)
    args = np.stack(args)
    h2, w2, h0, w0, flip, h1, w1, top, left, ch, cw = meta.T
    crop = (h1 != h0) | (w1 != w0) | (ch != h1) | (cw != w1)
    assert 0.3 < flip.mean() < 0.7 and 0.3 < crop.mean() < 0.7
    assert (top >= 0).all() and (left >= 0).all() and (top + ch <= h1).all() and (left + cw <= w1).all()
    lo_w, lo_h = np.minimum(w1, 70), np.minimum(h1, 70)
    assert ((cw >= lo_w) & (cw <= np.minimum(w1, 120)) | ~crop).all()
    assert ((ch >= lo_h) & (ch <= np.minimum(h1, 120)) | ~crop).all()
    for pos, room in ((left, w1 - cw), (top, h1 - ch)):  # uniform positions over the whole free range
        sel = crop & (room > 0)
        frac = pos[sel] / room[sel]
        assert 0.4 < frac.mean() < 0.6 and frac.min() < 0.1 and frac.max() > 0.9
    for i in range(256):
        if crop[i]:
            assert (h1[i], w1[i]) in {T.resized_shape(h0[i], w0[i], r) for r in (96, 112, 128)}
        assert (h2[i], w2[i]) in {T.resized_shape(ch[i], cw[i], s, 200) for s in (96, 112, 128, 144)}
    # the region resampled: the window mapped back to the file's pixels (mirrored when flipping)
    sx = w0 / w1
    src_left = np.where(flip > 0, w1 - left - cw, left)
    np.testing.assert_allclose(args[:, 3], src_left * sx, rtol=1e-5)
    np.testing.assert_allclose(args[:, 5], (src_left + cw) * sx, rtol=1e-5)
    np.testing.assert_allclose(args[:, 0:2], meta[:, 0:2])
    val = AugmentParams(cfg.data, train=False, seed=0)
    _, vmeta = val(shapes)
    for (h, w, _), m in zip(shapes, vmeta):
        assert tuple(m[:2]) == T.resized_shape(h, w, 128, 200) and tuple(m[5:]) == (h, w, 0, 0, h, w)


# ---------------------------------------------------------------------------------------------- torch parity

def torch_pinned(cfg, p: Pinned):
    d = cfg.data
    plain = T.RandomResize([p.scale], max_size=d.max_size)
    crop = T.Compose([T.RandomResize([p.crop_resize]), T.Crop(*p.crop), T.RandomResize([p.scale], max_size=d.max_size)])
    return T.Compose([T.RandomHorizontalFlip(1.0 if p.flip else 0.0),
                      T.RandomSelect(plain, crop, p=0.0 if p.crop_branch else 1.0), T.Normalize()])


PINS = [Pinned(flip=True, crop_branch=True, crop_resize=112, crop=(10, 8, 80, 100), scale=128),
        Pinned(flip=False, crop_branch=True, crop_resize=96, crop=(30, 20, 60, 70), scale=144),
        Pinned(flip=True, crop_branch=False, crop_resize=96, crop=(0, 0, 70, 70), scale=144),
        Pinned(flip=False, crop_branch=False, crop_resize=96, crop=(0, 0, 70, 70), scale=96),
        # the long side limit (200) lowers the short side: round(200 * 73 / 110) = 133
        Pinned(flip=True, crop_branch=True, crop_resize=112, crop=(5, 0, 73, 110), scale=144)]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("pin", range(len(PINS)))
def test_pinned_choices_match_torch(color_root, device, pin):
    p = PINS[pin]
    cfg = color_cfg(color_root)
    ds = build_dataset(cfg, "train")
    ds.transforms = torch_pinned(cfg, p)
    ref = {}
    for i in range(len(ds)):
        img, t = ds[i]
        ref[t["image_id"]] = (img, t)
    got = dali_items(DaliLoader(cfg, "train", ds, seed=0, device_id=device_id(device), pinned=p))
    assert set(got) == set(ref)
    dropped_some = False
    for image_id, (img, boxes, labels, size, orig) in got.items():
        rimg, rt = ref[image_id]
        assert size == rt["size"] and orig == rt["orig_size"]
        assert labels.tolist() == rt["labels"].tolist()  # same boxes kept, same order
        h, w = size
        torch.testing.assert_close(to_xyxy(boxes, h, w), to_xyxy(rt["boxes"], h, w), atol=1.0, rtol=0)
        diff = (T_denorm(img) - T_denorm(rimg)).abs()
        assert diff.mean() < 3.0, f"image {image_id}: mean abs difference {diff.mean():.2f} of 255"
        assert (diff > 40).float().mean() < 0.02
        n_file = sum(1 for a in ds.coco.imgToAnns.get(image_id, []) if not a["iscrowd"])
        dropped_some |= len(labels) < n_file
    if p.crop_branch:
        assert dropped_some  # the pinned crops cut some boxes away, and both pipelines dropped the same ones


def T_denorm(img):
    mean = torch.tensor(T.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(T.IMAGENET_STD).view(3, 1, 1)
    return (img * std + mean) * 255


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_val_matches_torch(color_root, device):
    cfg = color_cfg(color_root)
    ds = build_dataset(cfg, "val")
    ref = torch_items(ds)
    loader = DaliLoader(cfg, "val", ds, seed=0, device_id=device_id(device))
    got = dali_items(loader)
    assert sorted(got) == sorted(ref)
    for image_id, (img, boxes, labels, size, orig) in got.items():
        rimg, rt = ref[image_id]
        assert size == rt["size"] == tuple(img.shape[1:])
        assert labels.tolist() == rt["labels"].tolist()
        torch.testing.assert_close(to_xyxy(boxes, *size), to_xyxy(rt["boxes"], *size), atol=1.0, rtol=0)
        assert (T_denorm(img) - T_denorm(rimg)).abs().mean() < 3.0
    # image 3 has no annotations: kept, with an empty target; image 6's crowd box is not a target
    assert got[4][1].shape == (0, 4) and got[4][2].shape == (0,)
    assert 12 not in got[6][2].tolist() or any(a["category_id"] == 12 and not a["iscrowd"]
                                                for a in ds.coco.imgToAnns[6])


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_exif_orientation_ignored_as_the_torch_pipeline_does(tmp_path, device):
    """A JPEG tagged with EXIF orientation 6 (rotate 90 degrees): both pipelines use the stored pixel grid, in which
    COCO's boxes are drawn; same size, original size and boxes as the torch pipeline, and the same pixels."""
    root = tmp_path / "exif"
    write_color_set(root, n=2)
    doc = json.loads((root / "annotations" / "instances_val.json").read_text())
    name = doc["images"][1]["file_name"]  # 160 x 120 landscape
    arr = np.asarray(Image.open(root / "val" / name).convert("RGB"))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(root / "val" / name, quality=95, subsampling=0, exif=exif.tobytes())
    cfg = color_cfg(root)
    ds = build_dataset(cfg, "val")
    ref = torch_items(ds)
    got = dali_items(DaliLoader(cfg, "val", ds, seed=0, device_id=device_id(device)))
    assert sorted(got) == sorted(ref) == [1, 2]
    img, boxes, labels, size, orig = got[2]
    rimg, rt = ref[2]
    assert orig == tuple(rt["orig_size"]) == (120, 160)
    assert size == rt["size"] == tuple(img.shape[1:])
    assert labels.tolist() == rt["labels"].tolist()
    torch.testing.assert_close(to_xyxy(boxes, *size), to_xyxy(rt["boxes"], *size), atol=1.0, rtol=0)
    assert (T_denorm(img) - T_denorm(rimg)).abs().mean() < 3.0


@pytest.mark.needs_cuda
def test_gpu_batches_without_host_sync(color_root):
    """Turning DALI's output into a Batch (copies, targets, mask) issues no synchronizing CUDA call."""
    cfg = color_cfg(color_root, "train.device=cuda")
    loader = DaliLoader(cfg, "train", build_dataset(cfg, "train"), seed=0, device_id=torch.cuda.current_device())
    it = iter(loader)
    next(it)  # the first batch builds and starts the pipeline
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        b = next(it)
        b = b.to("cuda", non_blocking=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert b.images.is_cuda and b.targets["boxes"].is_cuda and b.mask.is_cuda


# ---------------------------------------------------------------------------------------------- random augmentation

@pytest.mark.parametrize("device", cpu_and_cuda())
def test_random_augmentation_keeps_boxes_on_their_colors(color_root, device):
    cfg = color_cfg(color_root)
    ds = build_dataset(cfg, "train")
    loader = DaliLoader(cfg, "train", ds, seed=3, device_id=device_id(device))
    shapes, kept_counts = set(), []
    for epoch in range(3):
        loader.set_epoch(epoch)
        for image_id, (img, boxes, labels, size, _orig) in dali_items(loader).items():
            h, w = size
            shapes.add(size)
            assert max(h, w) <= 200
            assert ((boxes[:, :2] - boxes[:, 2:] / 2) >= -1e-6).all() and ((boxes[:, :2] + boxes[:, 2:] / 2)
                                                                           <= 1 + 1e-6).all()
            target = {"boxes": boxes, "labels": labels, "size": size}
            check_consistent(img, target, margin=2, tol=40.0)
            kept_counts.append(len(labels) / max(1, sum(1 for a in ds.coco.imgToAnns.get(image_id, [])
                                                         if not a["iscrowd"])))
    assert len(shapes) > 5  # scales and crops vary
    assert min(kept_counts) < 1.0  # some crops removed boxes


def test_augmentation_distribution_matches_torch(color_root):
    """The output sizes of DALI's random choices and of the torch transforms have the same distribution (a
    two-sample chi-square-like comparison on the short side)."""
    cfg = color_cfg(color_root, "data.batch_size=12")
    ds = build_dataset(cfg, "train")
    loader = DaliLoader(cfg, "train", ds, seed=5)
    dali_sizes, torch_sizes = [], []
    chain = T.make_train_transforms(cfg.data)
    g = torch.Generator().manual_seed(0)
    for epoch in range(15):
        loader.set_epoch(epoch)
        for b in loader:
            dali_sizes += b.sizes.tolist()
        for i in range(len(ds)):
            ds.transforms = None
            img, t = ds[i]
            out, _ = chain(img, t, g)
            torch_sizes.append(list(out.shape[1:]))
    ds_short = np.array([min(s) for s in dali_sizes])
    ts_short = np.array([min(s) for s in torch_sizes])
    assert len(ds_short) == len(ts_short) == 180
    for v in (96, 112, 128, 144):  # the scales; the long-side limit lowers some
        assert abs((ds_short == v).mean() - (ts_short == v).mean()) < 0.12
    assert abs(ds_short.mean() - ts_short.mean()) < 4


# ---------------------------------------------------------------------------------------------- files, shards

def test_corrupt_jpeg_skipped_and_counted(tmp_path):
    root = tmp_path / "set"
    write_color_set(root)
    data = (root / "val" / "000002.jpg").read_bytes()
    (root / "val" / "000002.jpg").write_bytes(data[: len(data) // 2])
    (root / "val" / "000007.jpg").write_bytes(b"\xff\xd8\xff garbage")
    good, bad = scan_images(root / "val", [f"{k:06d}.jpg" for k in range(1, 13)])
    assert [n for n, _ in bad] == ["000002.jpg", "000007.jpg"] and len(good) == 10
    cfg = color_cfg(root, "data.batch_size=2")
    ds = build_dataset(cfg, "val")
    with pytest.warns(RuntimeWarning, match="2 unreadable image"):
        loader = DaliLoader(cfg, "val", ds, seed=0)
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = list(loader)
        ids = torch.cat([b.image_ids for b in batches]).tolist()
        assert sorted(ids) == [1, 3, 4, 5, 6, 8, 9, 10, 11, 12]
        assert sum(b.skipped for b in batches) == 2 and batches[0].skipped == 2


@pytest.mark.parametrize("split", ["train", "val"])
def test_each_image_once_per_epoch_per_shard(tmp_path, split):
    root = tmp_path / "shapes"
    make_shapes(root, num_train=24, num_val=11, image_size=48, seed=2)
    cfg = load_config(CONFIG, [f"data.root={root}", "data.batch_size=3", "data.num_workers=1", "train.device=cpu",
                               "data.scales=[48]", "data.crop_resize=[48]", "data.crop_min=32", "data.crop_max=48",
                               "data.val_size=48", "data.max_size=64"])
    ds = build_dataset(cfg, split)
    loaders = [DaliLoader(cfg, split, ds, rank=r, world_size=2, seed=1) for r in (0, 1)]
    n = len(ds)
    orders = []
    for epoch in range(2):
        seen = []
        for loader in loaders:
            loader.set_epoch(epoch)
            ids = torch.cat([b.image_ids for b in loader]).tolist()
            assert len(ids) == len(set(ids))  # once within the shard
            if split == "train":
                assert len(ids) == len(loader) * 3
            seen.append(ids)
        assert not set(seen[0]) & set(seen[1])  # shards are disjoint
        assert sorted(seen[0] + seen[1]) == list(range(1, n + 1))  # and cover the set (train: 2 x 4 batches of 3)
        orders.append(seen)
    if split == "train":
        assert orders[0] != orders[1]  # reshuffled each epoch
        # deterministic: a new loader with the same seed repeats the sequence
        fresh = DaliLoader(cfg, split, ds, rank=0, world_size=2, seed=1)
        again = []
        for epoch in range(2):
            fresh.set_epoch(epoch)
            again.append(torch.cat([b.image_ids for b in fresh]).tolist())
        assert again == [orders[0][0], orders[1][0]]
    else:
        assert orders[0] == orders[1]


def test_unequal_shards_same_step_count(tmp_path):
    root = tmp_path / "shapes"
    make_shapes(root, num_train=13, num_val=1, image_size=48, seed=2)
    cfg = load_config(CONFIG, [f"data.root={root}", "data.batch_size=3", "train.device=cpu", "data.scales=[48]",
                               "data.crop_resize=[48]", "data.crop_min=32", "data.crop_max=48", "data.max_size=64"])
    ds = build_dataset(cfg, "train")
    counts = []
    for r in (0, 1):
        loader = DaliLoader(cfg, "train", ds, rank=r, world_size=2, seed=0)
        counts.append((len(loader), sum(1 for _ in loader), sum(1 for _ in loader)))
    assert counts == [(2, 2, 2), (2, 2, 2)]  # shards of 6 and 7 images: 2 full batches each, every epoch


def test_build_loader_pipeline_choice(color_root, monkeypatch):
    cfg = color_cfg(color_root, "data.pipeline=dali")
    loader = build_loader(cfg, "train")
    assert isinstance(loader, DaliLoader) and loader.device_id is None
    loader.sampler.set_epoch(0)
    b = next(iter(loader))
    assert isinstance(b, Batch)
    assert not isinstance(build_loader(color_cfg(color_root, "data.pipeline=auto"), "train"), DaliLoader)
    import detr_fast.data as data

    monkeypatch.setattr(data, "dali_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs NVIDIA DALI"):
        build_loader(cfg, "train")


def test_gpu_check_script_runs_cpu_against_cpu():
    """benchmarks/dali_gpu_check.py (the GPU session's DALI diagnosis) runs; without a GPU it compares the CPU
    pipeline with itself, so every check must pass."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "dali_gpu_check.py"
    r = subprocess.run([sys.executable, str(script), "--mixed", "none"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "CPU_VS_MIXED OK" in r.stdout and "extent: OK" in r.stdout and "= torch" in r.stdout
