"""Dataset, collate, sampler, loader and the shapes generator, on tiny sets generated in tmp_path."""
import dataclasses
import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detr_fast.config import load_config
from detr_fast.data import (Batch, EpochSampler, build_dataset, build_loader, collate, ensure_dataset, make_shapes,
                            pad_batch)
from detr_fast.data.coco import annotations_to_target

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shapes.yaml"


def shapes_cfg(root, *extra):
    return load_config(CONFIG, [f"data.root={root}", "data.num_workers=0", "data.batch_size=4",
                                "data.shapes_train=10", "data.shapes_val=5", "data.shapes_image_size=64",
                                "train.device=cpu", *extra])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "set"
    make_shapes(root, num_train=10, num_val=5, image_size=64, seed=3)
    return root


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- generator

def test_generator_deterministic(tmp_path):
    a = make_shapes(tmp_path / "a", num_train=6, num_val=3, image_size=64, seed=11)
    b = make_shapes(tmp_path / "b", num_train=6, num_val=3, image_size=64, seed=11)
    c = make_shapes(tmp_path / "c", num_train=6, num_val=3, image_size=64, seed=12)
    da, db, dc = tree_digest(a), tree_digest(b), tree_digest(c)
    assert len(da) == 6 + 3 + 2 + 1  # images, two annotation files, shapes.json
    assert da == db
    assert da.keys() == dc.keys()
    assert all(da[k] != dc[k] for k in da if k.endswith(".jpg"))
    assert da["annotations/instances_train.json"] != dc["annotations/instances_train.json"]
    # train and val draw from different streams
    train0 = (a / "train" / "000000000001.jpg").read_bytes()
    assert train0 != (a / "val" / "000000000001.jpg").read_bytes()


def test_generator_annotations_valid(tiny):
    for split, n in (("train", 10), ("val", 5)):
        doc = json.loads((tiny / "annotations" / f"instances_{split}.json").read_text())
        assert [c["id"] for c in doc["categories"]] == [0, 1, 2, 3]
        assert len({c["name"] for c in doc["categories"]}) == 4
        assert len(doc["images"]) == n and [im["id"] for im in doc["images"]] == list(range(1, n + 1))
        ids = [a["id"] for a in doc["annotations"]]
        assert min(ids) >= 1 and len(set(ids)) == len(ids)
        per_image = {im["id"]: 0 for im in doc["images"]}
        for a in doc["annotations"]:
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64
            assert 0.12 * 64 - 1 <= max(w, h) and min(w, h) <= 0.6 * 64 + 1
            assert 0 < a["area"] <= w * h and a["iscrowd"] == 0 and 0 <= a["category_id"] < 4
            per_image[a["image_id"]] += 1
        assert all(1 <= k <= 4 for k in per_image.values())
        for im in doc["images"]:
            with Image.open(tiny / split / im["file_name"]) as f:
                assert f.format == "JPEG" and f.size == (64, 64)


def test_generator_boxes_are_tight():
    # the shape drawn last in a scene is fully visible: the pixels holding exactly its color span its box
    from detr_fast.data.synthetic import _render

    for i in range(20):
        pixels, objects = _render(96, 4, np.random.default_rng([5, 0, i]))
        assert pixels.shape == (96, 96, 3) and pixels.dtype == np.uint8 and 1 <= len(objects) <= 4
        _, (x, y, w, h), area = objects[-1]
        inside = pixels[y:y + h, x:x + w].reshape(-1, 3)
        colors, counts = np.unique(inside, axis=0, return_counts=True)
        color = colors[counts.argmax()]
        ys, xs = np.nonzero((pixels == color).all(-1))
        assert (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) == (x, y, w, h)
        assert counts.max() == area


def test_make_shapes_rejects_bad_args(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        make_shapes(tmp_path / "x", 1, 1, 64, 0, num_classes=9)
    with pytest.raises(ValueError, match="image_size"):
        make_shapes(tmp_path / "x", 1, 1, 8, 0)


# ---------------------------------------------------------------------------------------------- dataset

def test_dataset_items(tiny):
    cfg = shapes_cfg(tiny)
    ds = build_dataset(cfg, "val")
    assert len(ds) == 5
    doc = json.loads((tiny / "annotations" / "instances_val.json").read_text())
    for i in range(len(ds)):
        image, t = ds[i]
        assert image.dtype == torch.float32 and image.shape == (3, 128, 128)  # val_size 128, from 64 px
        assert set(t) >= {"boxes", "labels", "image_id", "orig_size", "size"}
        assert t["orig_size"] == (64, 64) and t["size"] == (128, 128)
        anns = [a for a in doc["annotations"] if a["image_id"] == t["image_id"]]
        assert t["labels"].tolist() == [a["category_id"] for a in anns]
        expect = torch.tensor([[(x + w / 2) / 64, (y + h / 2) / 64, w / 64, h / 64] for x, y, w, h in
                               (a["bbox"] for a in anns)])
        torch.testing.assert_close(t["boxes"], expect)
        assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
    # normalized with the ImageNet statistics: the mean of an image is far from the [0, 1] range's
    assert image.min() < 0


def test_crowd_dropped_empty_images_kept(tmp_path, tiny):
    root = tmp_path / "set"
    shutil.copytree(tiny, root)
    ann = root / "annotations" / "instances_train.json"
    doc = json.loads(ann.read_text())
    first = doc["images"][0]["id"]
    second = doc["images"][1]["id"]
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != second]  # image 2: no annotations
    doc["annotations"].append({"id": 10_000, "image_id": first, "category_id": 2, "bbox": [1, 1, 30, 30],
                               "area": 900, "iscrowd": 1})
    ann.write_text(json.dumps(doc))
    cfg = shapes_cfg(root)
    ds = build_dataset(cfg, "train")
    assert len(ds) == 10
    ids = ds.ids
    n_first = sum(1 for a in doc["annotations"] if a["image_id"] == first and not a["iscrowd"])
    _, t = ds[ids.index(first)]
    assert len(t["labels"]) <= n_first  # the crowd box never appears (crops may drop more)
    target = annotations_to_target([a for a in doc["annotations"] if a["image_id"] == first], 64, 64)
    assert len(target["labels"]) == n_first
    _, t2 = ds[ids.index(second)]
    assert t2["boxes"].shape == (0, 4) and t2["labels"].shape == (0,)


def test_annotation_boxes_clipped_to_image():
    anns = [{"bbox": [-5, 10, 20, 70], "category_id": 1}, {"bbox": [70, 0, 5, 5], "category_id": 2},
            {"bbox": [3, 4, 0, 5], "category_id": 3}]
    t = annotations_to_target(anns, 64, 64)
    assert t["labels"].tolist() == [1]
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.0, 10.0, 15.0, 64.0]]))


def test_missing_paths_clear_errors(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        build_dataset(shapes_cfg(tmp_path / "nowhere"), "train")
    root = tmp_path / "noimg"
    shutil.copytree(tiny, root)
    shutil.rmtree(root / "val")
    with pytest.raises(FileNotFoundError, match=r"val image folder not found: .*noimg/val"):
        build_dataset(shapes_cfg(root), "val")
    with pytest.raises(FileNotFoundError, match="val image folder"):
        ensure_dataset(shapes_cfg(root, "data.shapes_seed=3"))  # the set's own parameters
    coco = load_config(None, [f"data.root={tmp_path / 'coco'}"])
    with pytest.raises(FileNotFoundError, match=r"instances_train2017\.json"):
        ensure_dataset(coco)
    explicit = load_config(None, [f"data.train_ann={tiny / 'annotations' / 'instances_train.json'}",
                                  f"data.train_images={tmp_path / 'missing_imgs'}"])
    with pytest.raises(FileNotFoundError, match="missing_imgs"):
        build_dataset(explicit, "train")


def test_num_classes_too_small(tiny):
    with pytest.raises(ValueError, match="num_classes=3.*up to 3"):
        build_dataset(shapes_cfg(tiny, "model.num_classes=3"), "train")
    build_dataset(shapes_cfg(tiny, "model.num_classes=4"), "train")


def test_ensure_dataset_generates_shapes(tmp_path):
    root = tmp_path / "gen" / "shapes"
    cfg = shapes_cfg(root)
    ensure_dataset(cfg)
    assert len(list((root / "train").glob("*.jpg"))) == 10 and len(list((root / "val").glob("*.jpg"))) == 5
    before = tree_digest(root)
    ensure_dataset(cfg)  # exists: left alone
    assert tree_digest(root) == before
    assert not [p for p in root.parent.iterdir() if p.name != "shapes"]  # no temporary folders left
    # a set made with other parameters is an error that names the difference, and nothing is deleted
    with pytest.raises(ValueError, match=r"num_train 10 \(config: 12\).*Remove"):
        ensure_dataset(shapes_cfg(root, "data.shapes_train=12"))
    with pytest.raises(ValueError, match=r"seed 0 \(config: 4\)"):
        ensure_dataset(shapes_cfg(root, "data.shapes_seed=4"))
    assert tree_digest(root) == before
    # a set without shapes.json (older or hand-made): its image counts are compared
    (root / "shapes.json").unlink()
    before = tree_digest(root)
    ensure_dataset(cfg)
    with pytest.raises(ValueError, match=r"num_val 5 \(config: 6\)"):
        ensure_dataset(shapes_cfg(root, "data.shapes_val=6"))
    assert tree_digest(root) == before


def test_generator_parallel_equals_serial(tmp_path):
    serial = make_shapes(tmp_path / "s", num_train=70, num_val=64, image_size=48, seed=5, workers=1)
    parallel = make_shapes(tmp_path / "p", num_train=70, num_val=64, image_size=48, seed=5, workers=2)
    assert tree_digest(serial) == tree_digest(parallel)


# ---------------------------------------------------------------------------------------------- collate

def item(h, w, n, image_id, fill):
    img = torch.full((3, h, w), float(fill))
    t = {"boxes": torch.rand(n, 4), "labels": torch.arange(n) + 1, "image_id": image_id, "orig_size": (h * 2, w * 2),
         "size": (h, w)}
    return img, t


def test_collate_exact():
    items = [item(5, 7, 2, 11, 1.0), None, item(6, 4, 0, 12, 2.0), item(3, 3, 3, 13, 3.0)]
    b = collate(items)
    assert isinstance(b, Batch) and b.skipped == 1 and len(b) == 3
    assert b.images.shape == (3, 3, 6, 7) and b.images.dtype == torch.float32
    assert b.mask.shape == (3, 6, 7) and b.mask.dtype == torch.bool
    for i, (img, t) in enumerate([items[0], items[2], items[3]]):
        h, w = img.shape[1:]
        assert torch.equal(b.images[i, :, :h, :w], img)
        assert (b.images[i, :, h:, :] == 0).all() and (b.images[i, :, :, w:] == 0).all()
        assert not b.mask[i, :h, :w].any() and b.mask[i, h:, :].all() and b.mask[i, :, w:].all()
        n = len(t["labels"])
        assert b.targets["num_targets"][i] == n
        assert torch.equal(b.targets["labels"][i, :n], t["labels"]) and (b.targets["labels"][i, n:] == 0).all()
        assert torch.equal(b.targets["boxes"][i, :n], t["boxes"]) and (b.targets["boxes"][i, n:] == 0).all()
        assert b.image_ids[i] == t["image_id"]
        assert b.orig_sizes[i].tolist() == list(t["orig_size"]) and b.sizes[i].tolist() == [h, w]
    assert b.targets["labels"].shape == (3, 3) and b.targets["labels"].dtype == torch.int64
    assert b.targets["boxes"].shape == (3, 3, 4) and b.targets["boxes"].dtype == torch.float32
    for tensor in (b.targets["num_targets"], b.image_ids, b.orig_sizes, b.sizes):
        assert tensor.dtype == torch.int64


def test_collate_no_targets_and_all_skipped():
    b = collate([item(4, 4, 0, 1, 1.0), item(2, 5, 0, 2, 1.0)])
    assert b.targets["labels"].shape == (2, 0) and b.targets["boxes"].shape == (2, 0, 4)
    assert b.targets["num_targets"].tolist() == [0, 0]
    empty = collate([None, None])
    assert len(empty) == 0 and empty.skipped == 2


def test_batch_to_and_pin():
    b = collate([item(4, 4, 1, 1, 1.0)])
    moved = b.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.images, b.images) and moved.skipped == b.skipped
    assert set(moved.targets) == {"labels", "boxes", "num_targets"}
    # Batch.to("cpu") waits for the copies of every tensor that _tensors() lists: it must list all of them
    fields = [getattr(b, f.name) for f in dataclasses.fields(b)]
    every = [t for v in fields for t in (v.values() if isinstance(v, dict) else [v]) if isinstance(t, torch.Tensor)]
    assert len(every) == len(b._tensors()) and all(any(t is u for u in b._tensors()) for t in every)
    if torch.cuda.is_available():
        assert b.pin_memory().images.is_pinned()


@pytest.mark.needs_cuda
def test_batch_to_cpu_waits_for_queued_gpu_work():
    """Batch.to("cpu") (non_blocking by default) from a GPU batch returns the values, not a pinned buffer that the
    copy has yet to fill: the GPU tensors are produced behind ~0.1 s of queued work, so an unsynchronized read sees
    zeros or stale memory. (This is what made the DALI `mixed` tests report sizes (0, 0).)"""
    b = collate([item(5, 7, 2, 11, 1.0), item(6, 4, 0, 12, 2.0), item(3, 9, 3, 13, 3.0)])
    b.sizes += 1000  # values a fresh or recycled pinned block is unlikely to hold
    g = b.to("cuda")
    torch.cuda.synchronize()
    for _ in range(3):
        torch.cuda._sleep(100_000_000)  # queue work ahead of the tensors' producers and the copies
        late = g._map(lambda t: t.clone())  # written on the GPU only after the sleep
        back = late.to("cpu")
        for got, want in zip(back._tensors(), b._tensors()):
            assert got.device.type == "cpu" and torch.equal(got, want)


# ---------------------------------------------------------------------------------------------- corrupt images

def corrupt(root: Path, split: str, index: int) -> int:
    doc = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
    im = doc["images"][index]
    path = root / split / im["file_name"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # truncated JPEG
    return im["id"]


def test_corrupt_jpeg_skipped_and_counted(tmp_path, tiny):
    root = tmp_path / "set"
    shutil.copytree(tiny, root)
    bad_id = corrupt(root, "val", 2)
    (root / "val" / "000000000004.jpg").write_bytes(b"not a jpeg at all")
    cfg = shapes_cfg(root, "data.batch_size=2")
    ds = build_dataset(cfg, "val")
    with pytest.warns(RuntimeWarning, match="skipping unreadable image"):
        assert ds[ds.ids.index(bad_id)] is None
    loader = build_loader(cfg, "val")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        batches = list(loader)
    seen = torch.cat([b.image_ids for b in batches]).tolist()
    assert sorted(seen) == [1, 2, 5]
    assert sum(b.skipped for b in batches) == 2


def test_all_bad_batch_is_carried(tmp_path, tiny):
    root = tmp_path / "set"
    shutil.copytree(tiny, root)
    for name in ("000000000001.jpg", "000000000002.jpg"):
        (root / "val" / name).write_bytes(b"\xff\xd8garbage")
    loader = build_loader(shapes_cfg(root, "data.batch_size=2"), "val")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        batches = list(loader)
    assert all(len(b) > 0 for b in batches)
    assert batches[0].skipped == 2 and sum(b.skipped for b in batches) == 2
    assert sorted(torch.cat([b.image_ids for b in batches]).tolist()) == [3, 4, 5]


# ---------------------------------------------------------------------------------------------- sampler, loader

class _Len:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def _ids(x):
    return [i if isinstance(i, int) else i[0] for i in x]


@pytest.mark.parametrize("n", [10, 11])
def test_distributed_shards(n):
    for shuffle in (True, False):
        shards = [EpochSampler(_Len(n), num_replicas=2, rank=r, shuffle=shuffle, seed=5) for r in (0, 1)]
        for s in shards:
            s.set_epoch(3)
        a, b = (_ids(list(s)) for s in shards)
        assert len(a) == len(shards[0]) and len(b) == len(shards[1])
        assert set(a) | set(b) == set(range(n))
        if shuffle:
            assert len(a) == len(b) == -(-n // 2)  # equal steps on every rank
            assert len(set(a) & set(b)) == (0 if n % 2 == 0 else 1)  # only the padding repeats
        else:
            assert not set(a) & set(b) and len(a) + len(b) == n  # evaluation: each image exactly once


def test_sampler_epochs_and_seeds():
    s = EpochSampler(_Len(50), shuffle=True, seed=1)
    s.set_epoch(0)
    e0 = list(s)
    assert list(s) == e0
    s.set_epoch(1)
    e1 = list(s)
    assert _ids(e0) != _ids(e1) and sorted(_ids(e0)) == sorted(_ids(e1)) == list(range(50))
    assert len({seed for _, seed in e0 + e1}) == 100  # a fresh augmentation per item and epoch


def test_train_loader_deterministic_across_workers(tiny):
    def run(workers):
        loader = build_loader(shapes_cfg(tiny, f"data.num_workers={workers}"), "train", epoch_seed=9)
        out = []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            out.append([(b.image_ids.clone(), b.images.clone(), b.targets["boxes"].clone()) for b in loader])
        return out

    a, b = run(0), run(2)
    assert len(a[0]) == 2  # 10 images, batch 4, drop_last
    for ea, eb in zip(a, b):
        for (ia, xa, ba), (ib, xb, bb) in zip(ea, eb):
            assert torch.equal(ia, ib) and torch.equal(xa, xb) and torch.equal(ba, bb)
    assert not torch.equal(a[0][0][0], a[1][0][0])  # another epoch, another order


def test_distributed_loaders_disjoint(tiny):
    cfg = shapes_cfg(tiny, "data.batch_size=1")
    seen = []
    for rank in (0, 1):
        loader = build_loader(cfg, "val", distributed=True, rank=rank, world_size=2)
        seen.append(torch.cat([b.image_ids for b in loader]).tolist())
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == [1, 2, 3, 4, 5]
    train = [build_loader(cfg, "train", distributed=True, rank=r, world_size=2) for r in (0, 1)]
    ids = [torch.cat([b.image_ids for b in loader]).tolist() for loader in train]
    assert not set(ids[0]) & set(ids[1]) and sorted(ids[0] + ids[1]) == list(range(1, 11))


def test_padded_batch_fixed_shapes():
    items = [item(37, 50, 2, 1, 1.0), item(20, 61, 0, 2, 2.0)]
    b = collate(items)
    p = pad_batch(b, [32, 48, 64, 96], max_targets=5)
    assert p.images.shape == (2, 3, 48, 64) and p.mask.shape == (2, 48, 64)
    assert p.targets["labels"].shape == (2, 5) and p.targets["boxes"].shape == (2, 5, 4)
    torch.testing.assert_close(p.images[:, :, :37, :61], b.images)
    assert p.images[:, :, 37:].abs().sum() == 0 and p.images[..., 61:].abs().sum() == 0
    assert p.mask[:, 37:].all() and p.mask[..., 61:].all()
    assert torch.equal(p.mask[:, :37, :61], b.mask)
    assert torch.equal(p.targets["labels"][:, :2], b.targets["labels"]) and not p.targets["labels"][:, 2:].any()
    assert torch.equal(p.targets["boxes"][:, :2], b.targets["boxes"]) and not p.targets["boxes"][:, 2:].any()
    assert torch.equal(p.targets["num_targets"], b.targets["num_targets"])
    assert torch.equal(p.sizes, b.sizes) and torch.equal(p.image_ids, b.image_ids)
    assert pad_batch(b) is b  # nothing asked: the same batch
    assert pad_batch(b, [37, 61], 2) is b  # already at the bucket sizes
    with pytest.raises(ValueError, match="exceeds every size in data.pad_to"):
        pad_batch(b, [32, 48])
    with pytest.raises(ValueError, match="max_targets=1"):
        pad_batch(b, [], max_targets=1)
