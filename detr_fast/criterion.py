"""Hungarian matching and DETR's set loss on padded targets, for all decoder layers at once.

Targets are the padded dict {labels [B, T] int64, boxes [B, T, 4] cxcywh, num_targets [B] int64}; rows
t >= num_targets[b] are padding. The matcher stacks the final and auxiliary outputs into [L, B, Q, .] and solves
every (layer, image) problem in one matching_cost + one linear_assignment call. Nothing here reads a device value
on the host (the reference ops do: scipy runs on the CPU).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from detr_fast import ops
from detr_fast.ops import reference


def _ops(kernels: str):
    if kernels not in ("fused", "reference"):
        raise ValueError(f"kernels must be 'fused' or 'reference', got {kernels!r}")
    return ops if kernels == "fused" else reference


class HungarianMatcher(nn.Module):
    """Optimal one-to-one matching of targets to queries under DETR's cost (class, L1, GIoU)."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 kernels: str = "fused"):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.ops = _ops(kernels)

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, boxes: torch.Tensor, targets: dict) -> torch.Tensor:
        """logits [*, B, Q, C+1], boxes [*, B, Q, 4] -> assignment [*, B, Q] int64 (target index or -1)."""
        cost = self.ops.matching_cost(logits, boxes, targets["labels"], targets["boxes"], targets["num_targets"],
                                      self.cost_class, self.cost_bbox, self.cost_giou)  # [*, B, Q, T]
        return self.ops.linear_assignment(cost, targets["num_targets"])


class SetCriterion(nn.Module):
    """DETR's loss: weighted cross-entropy over all queries (no-object weighted eos_coef), L1 and 1 - GIoU over
    matched pairs divided by the number of target boxes averaged over workers (at least 1); the same for every
    auxiliary decoder layer with suffix _i."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict, eos_coef: float = 0.1,
                 kernels: str = "fused"):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.ops = _ops(kernels)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def num_boxes(self, targets: dict) -> torch.Tensor:
        """Number of target boxes in the batch, averaged over distributed workers, at least 1 (a device tensor)."""
        n = targets["num_targets"].sum().to(torch.float32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:  # one process: a no-op
            dist.all_reduce(n)
            n = n / dist.get_world_size()
        return n.clamp(min=1.0)

    def forward(self, outputs: dict, targets: dict) -> dict:
        aux = outputs.get("aux_outputs", [])
        if "all_logits" in outputs and outputs["all_logits"].shape[0] == len(aux) + 1:  # DETR's stacked layers
            logits, boxes = outputs["all_logits"], outputs["all_boxes"]
        else:
            logits = torch.stack([a["pred_logits"] for a in aux] + [outputs["pred_logits"]])  # [L, B, Q, C+1]
            boxes = torch.stack([a["pred_boxes"] for a in aux] + [outputs["pred_boxes"]])  # [L, B, Q, 4]
        L, B, Q, _ = logits.shape
        assignment = self.matcher(logits.detach(), boxes.detach(), targets)  # [L, B, Q]
        matched = assignment >= 0  # [L, B, Q]
        T = targets["labels"].shape[1]
        if T > 0:
            idx = assignment.clamp(min=0)  # [L, B, Q]
            labels = targets["labels"][None].expand(L, B, T).gather(2, idx)  # [L, B, Q]
            tgt_boxes = targets["boxes"][None].expand(L, B, T, 4).gather(2, idx[..., None].expand(L, B, Q, 4))
        else:
            labels = torch.zeros_like(assignment)
            tgt_boxes = torch.zeros_like(boxes)
        target_classes = torch.where(matched, labels, torch.full_like(labels, self.num_classes))  # [L, B, Q]

        # weighted mean cross-entropy per layer, as F.cross_entropy(weight=...) computes it per layer
        nll = F.cross_entropy(logits.float().flatten(0, 2), target_classes.flatten(), self.empty_weight,
                              reduction="none").view(L, B * Q)
        loss_ce = nll.sum(1) / self.empty_weight[target_classes].view(L, B * Q).sum(1)  # [L]

        num_boxes = self.num_boxes(targets)
        l1, giou = self.ops.box_loss(boxes.float().reshape(-1, 4), tgt_boxes.float().reshape(-1, 4))  # [L*B*Q]
        m = matched.view(-1)
        zero = torch.zeros((), dtype=l1.dtype, device=l1.device)
        loss_bbox = torch.where(m, l1, zero).view(L, -1).sum(1) / num_boxes  # [L]
        loss_giou = torch.where(m, giou, zero).view(L, -1).sum(1) / num_boxes  # [L]

        stacked = torch.stack((loss_ce, loss_bbox, loss_giou), 1).flatten()  # [L * 3], layer by layer
        keys = []
        for i in range(L):
            sfx = "" if i == L - 1 else f"_{i}"
            keys += ["loss_ce" + sfx, "loss_bbox" + sfx, "loss_giou" + sfx]
        return Losses(keys, stacked)


class Losses(dict):
    """The criterion's losses: a dict of scalar tensors by name, views of one tensor `stacked` [K] whose order
    `stacked_keys` gives. weighted_total uses `stacked` directly: a weighted sum in two kernels, and a backward that
    needs no per-loss operators (each scalar view used on its own costs a select, a multiply and an add forward, and a
    zero-filled buffer, a copy and an add backward)."""

    def __init__(self, keys: list, stacked: torch.Tensor):
        views = stacked.unbind(0)
        super().__init__(zip(keys, views))
        self.stacked_keys = list(keys)
        self.stacked = stacked
        self._views = views

    def intact(self) -> bool:
        """Whether the dict still holds exactly the stacked values (a caller may have replaced or added losses; then
        `stacked` no longer tells the whole story)."""
        return len(self) == len(self._views) and all(self.get(k) is v for k, v in zip(self.stacked_keys, self._views))


def weighted_total(losses: dict, weight_dict: dict, keys: list | None = None, weights: torch.Tensor | None = None):
    """(total, keys, weights, vals): total = sum of weight * loss over `keys` (default: the losses' own order for an
    intact Losses, else sorted names), weights [K] on the losses' device (built from weight_dict when not given; a name
    missing from it weighs 0), vals [K] the fp32 losses in that order."""
    stacked = isinstance(losses, Losses) and losses.intact()
    if keys is None:
        keys = list(losses.stacked_keys) if stacked else sorted(losses)
    if weights is None:
        device = next(iter(losses.values())).device
        weights = torch.tensor([float(weight_dict.get(k, 0.0)) for k in keys], device=device)
    if stacked and losses.stacked_keys == keys:
        vals = losses.stacked.float()
    else:
        vals = torch.stack([losses[k].float() for k in keys])
    return (vals * weights).sum(), keys, weights, vals


def build_criterion(cfg) -> SetCriterion:
    """Build SetCriterion (with its matcher) from a Config."""
    lc, m = cfg.loss, cfg.model
    matcher = HungarianMatcher(lc.set_cost_class, lc.set_cost_bbox, lc.set_cost_giou, kernels=m.kernels)
    base = {"loss_ce": lc.ce_loss_coef, "loss_bbox": lc.bbox_loss_coef, "loss_giou": lc.giou_loss_coef}
    weight_dict = dict(base)
    if m.aux_loss:
        for i in range(m.dec_layers - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
    return SetCriterion(m.num_classes, matcher, weight_dict, eos_coef=lc.eos_coef, kernels=m.kernels)
