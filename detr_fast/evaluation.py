"""COCO box evaluation: DETR's postprocess and pycocotools' COCOeval on the dataset's ground truth.

    stats = evaluate(model, loader, device)   # {"AP": ..., "AP50": ..., ..., "ARl": ...}

Predictions stay on the device during the loop and are copied to the host once at the end; in a distributed run
each rank evaluates its shard and rank 0 gathers the detections, runs COCOeval and broadcasts the numbers.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from detr_fast import dist
from detr_fast.ops.reference import box_cxcywh_to_xyxy

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@torch.no_grad()
def postprocess(pred_logits: torch.Tensor, pred_boxes: torch.Tensor, orig_sizes: torch.Tensor):
    """DETR outputs -> per-query detections in original image pixels.

    pred_logits [B, Q, C+1] (last class = no object), pred_boxes [B, Q, 4] normalized (cx, cy, w, h),
    orig_sizes [B, 2] (h, w). Returns scores [B, Q] (max class probability, no-object excluded),
    labels [B, Q] int64 (its argmax), boxes [B, Q, 4] absolute (x0, y0, x1, y1).
    """
    prob = F.softmax(pred_logits.float(), dim=-1)[..., :-1]  # [B, Q, C]
    scores, labels = prob.max(dim=-1)  # [B, Q]
    xyxy = box_cxcywh_to_xyxy(pred_boxes.float())  # [B, Q, 4]
    img_h, img_w = orig_sizes.to(xyxy.dtype).unbind(-1)  # [B]
    scale = torch.stack((img_w, img_h, img_w, img_h), dim=-1)[:, None, :]  # [B, 1, 4]
    return scores, labels, xyxy * scale


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] (x0, y0, x1, y1) -> [..., 4] COCO (x, y, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack((x0, y0, x1 - x0, y1 - y0), dim=-1)


def label_to_category_map(dataset) -> dict[int, int] | None:
    """The dataset's contiguous-label -> COCO category id map, if it has one (None: label == category id,
    as in DETR's COCO setup with num_classes = 91)."""
    for name in ("label_to_cat_id", "label_to_category", "contiguous_to_cat_id"):
        m = getattr(dataset, name, None)
        if m is not None:
            return dict(enumerate(m)) if isinstance(m, (list, tuple)) else dict(m)
    return None


def to_coco_results(image_ids, scores, labels, boxes_xyxy, label_map: dict[int, int] | None = None) -> list[dict]:
    """Host tensors image_ids [N], scores [N, Q], labels [N, Q], boxes_xyxy [N, Q, 4] -> COCO result dicts
    {image_id, category_id, bbox [x, y, w, h], score}. Repeated image ids (a distributed sampler pads its shards
    with repeats) keep their first occurrence only."""
    xywh = xyxy_to_xywh(boxes_xyxy).tolist()  # host tensors (see the docstring): no device sync
    scores, labels, ids = scores.tolist(), labels.tolist(), image_ids.tolist()
    seen, out = set(), []
    for i, img in enumerate(ids):
        if img in seen:
            continue
        seen.add(img)
        for s, lab, box in zip(scores[i], labels[i], xywh[i]):
            cat = label_map.get(lab, lab) if label_map else lab
            out.append({"image_id": int(img), "category_id": int(cat), "bbox": [float(v) for v in box],
                        "score": float(s)})
    return out


def coco_stats(coco_gt, results: list[dict], img_ids: list[int] | None = None) -> tuple[dict, str]:
    """Run COCOeval (bbox) and return ({AP, AP50, ..., ARl}, the printed 12-line summary).

    img_ids: images to evaluate (None: every image of the ground truth; images without detections count as
    misses). With no detections at all every number is 0.
    """
    from pycocotools.cocoeval import COCOeval

    ids = sorted(coco_gt.getImgIds()) if img_ids is None else sorted(set(img_ids))
    if not results:
        stats = {k: 0.0 for k in STAT_NAMES}
        return stats, "no detections: every AP/AR is 0\n"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        ev.summarize()
    return {k: float(v) for k, v in zip(STAT_NAMES, ev.stats)}, table.getvalue()


def _model_outputs(model, batch, amp_ctx):
    with amp_ctx():
        out = model(batch.images, batch.mask)
    return out["pred_logits"], out["pred_boxes"]


@torch.no_grad()
def evaluate(model, loader, device, amp: str = "none", output_path: str | os.PathLike | None = None,
             max_batches: int = 0, log=print) -> dict:
    """COCO bbox evaluation of `model` on `loader` (whose dataset exposes `.coco`, the pycocotools ground truth).

    Prints the standard 12-number table on rank 0, writes it as JSON to output_path (rank 0) and returns
    {AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl} on every rank. max_batches > 0 evaluates
    only that many batches (and only their images).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    amp_ctx = autocast_context(device, amp)
    ids, scores, labels, boxes = [], [], [], []
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        batch = batch.to(device, non_blocking=True)
        logits, pboxes = _model_outputs(model, batch, amp_ctx)
        s, lab, b = postprocess(logits, pboxes, batch.orig_sizes)
        ids.append(batch.image_ids)
        scores.append(s)
        labels.append(lab)
        boxes.append(b)
    model.train(was_training)
    if ids:
        # sync: one device -> host copy for the whole split, after the loop; COCOeval runs on the host
        local = [torch.cat(t).cpu() for t in (ids, scores, labels, boxes)]
    else:
        local = [torch.zeros(0, dtype=torch.int64), torch.zeros(0, 0), torch.zeros(0, 0, dtype=torch.int64),
                 torch.zeros(0, 0, 4)]
    dataset = loader.dataset
    results = to_coco_results(*local, label_map=label_to_category_map(dataset))
    seen_ids = local[0].tolist()  # sync: none, a host tensor already (the one copy above)
    gathered = dist.all_gather_object((results, seen_ids))
    stats = None
    if dist.is_main_process():
        all_results, all_ids, seen = [], [], set()
        for res, img_ids in gathered:
            fresh = {i for i in img_ids if i not in seen}
            all_results += [r for r in res if r["image_id"] in fresh]
            seen |= fresh
            all_ids += img_ids
        stats, table = coco_stats(dataset.coco, all_results, img_ids=all_ids if max_batches else None)
        if log is not None:
            log(table.rstrip("\n"))
        if output_path is not None:
            Path(output_path).parent.mkdir(parents=True, exist_ok=True)
            Path(output_path).write_text(json.dumps(stats, indent=1) + "\n")
    return dist.broadcast_object(stats)


def autocast_context(device: torch.device, amp: str):
    """A zero-argument factory of the autocast context for `amp` in none|bf16|fp16."""
    if amp == "none":
        return contextlib.nullcontext
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def format_stats(stats: dict) -> str:
    """One line: AP 0.550 | AP50 0.900 | ..."""
    return " | ".join(f"{k} {stats[k]:.3f}" for k in STAT_NAMES if k in stats)
