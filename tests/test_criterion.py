"""Matcher against brute-force enumeration; set-loss values on hand-computed cases; padding never leaks."""
import itertools
from pathlib import Path
import math

import pytest
import torch

from detr_fast.criterion import HungarianMatcher, SetCriterion, build_criterion
from detr_fast.config import load_config
from detr_fast.ops import reference


def _targets(labels, boxes, num):
    return {"labels": torch.tensor(labels, dtype=torch.int64), "boxes": torch.tensor(boxes, dtype=torch.float32),
            "num_targets": torch.tensor(num, dtype=torch.int64)}


def _random_problem(g, B, Q, T, C):
    logits = torch.randn(B, Q, C + 1, generator=g)
    cxcy = torch.rand(B, Q, 2, generator=g) * 0.8 + 0.1
    wh = torch.rand(B, Q, 2, generator=g) * 0.3 + 0.02
    pred = torch.cat((cxcy, wh), -1)
    num = torch.randint(0, T + 1, (B,), generator=g)
    labels = torch.randint(0, C, (B, T), generator=g)
    tb = torch.cat((torch.rand(B, T, 2, generator=g) * 0.8 + 0.1, torch.rand(B, T, 2, generator=g) * 0.3 + 0.02), -1)
    return logits, pred, {"labels": labels, "boxes": tb, "num_targets": num}


@pytest.mark.parametrize("kernels", ["fused", "reference"])
def test_matcher_equals_brute_force(kernels):
    g = torch.Generator().manual_seed(1)
    matcher = HungarianMatcher(1.0, 5.0, 2.0, kernels=kernels)
    for trial in range(40):
        Q = int(torch.randint(1, 6, (1,), generator=g))
        T = int(torch.randint(0, Q + 1, (1,), generator=g))
        logits, pred, tg = _random_problem(g, 3, Q, T, 4)
        assign = matcher(logits, pred, tg)  # [B, Q]
        cost = reference.matching_cost(logits, pred, tg["labels"], tg["boxes"], tg["num_targets"], 1.0, 5.0, 2.0)
        for b in range(3):
            n = int(tg["num_targets"][b])
            a = assign[b]
            # every real target matched exactly once, nothing else matched
            assert sorted(a[a >= 0].tolist()) == list(range(n))
            got = sum(float(cost[b, q, a[q]]) for q in range(Q) if a[q] >= 0)
            best = min((sum(float(cost[b, perm[t], t]) for t in range(n))
                        for perm in itertools.permutations(range(Q), n)), default=0.0)
            assert got == pytest.approx(best, rel=1e-6, abs=1e-6)


def _criterion(num_classes=2, eos=0.1, kernels="fused"):
    matcher = HungarianMatcher(1.0, 5.0, 2.0, kernels=kernels)
    return SetCriterion(num_classes, matcher, {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}, eos, kernels=kernels)


@pytest.mark.parametrize("kernels", ["fused", "reference"])
def test_loss_values_hand_computed(kernels):
    crit = _criterion(kernels=kernels)
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]]])  # [B=1, Q=2, C+1=3]
    boxes = torch.tensor([[[0.6, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]])
    tg = _targets([[0]], [[[0.5, 0.5, 0.2, 0.2]]], [1])
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, tg)
    # query 0 matches the target (class 0), query 1 is "no object" (index 2, weight 0.1)
    nll0 = -math.log(math.exp(2) / (math.exp(2) + 2))
    nll1 = -math.log(math.exp(3) / (math.exp(3) + 2))
    assert float(losses["loss_ce"]) == pytest.approx((nll0 + 0.1 * nll1) / 1.1, rel=1e-6)
    assert float(losses["loss_bbox"]) == pytest.approx(0.1, rel=1e-5)
    # boxes [0.5,0.7]x[0.4,0.6] and [0.4,0.6]x[0.4,0.6]: IoU 1/3, enclosing area = union -> GIoU 1/3
    assert float(losses["loss_giou"]) == pytest.approx(2.0 / 3.0, rel=1e-5)


def test_num_boxes_padding_aux_and_empty():
    crit = _criterion(num_classes=3)
    g = torch.Generator().manual_seed(0)
    logits, pred, tg = _random_problem(g, 2, 6, 3, 3)
    tg["num_targets"] = torch.tensor([3, 1])
    aux = [{"pred_logits": torch.randn(2, 6, 4, generator=g), "pred_boxes": pred.flip(1)} for _ in range(2)]
    out = {"pred_logits": logits, "pred_boxes": pred, "aux_outputs": aux}
    losses = crit(out, tg)
    assert set(losses) == {f"loss_{k}{s}" for k in ("ce", "bbox", "giou") for s in ("", "_0", "_1")}
    # the box loss is normalized by 4 real boxes: recompute by hand from the matched pairs
    assign = crit.matcher(logits, pred, tg)
    l1 = sum(float((pred[b, q] - tg["boxes"][b, assign[b, q]]).abs().sum())
             for b in range(2) for q in range(6) if assign[b, q] >= 0)
    assert float(losses["loss_bbox"]) == pytest.approx(l1 / 4, rel=1e-5)
    # padded target rows never leak: garbage there changes nothing
    tg2 = {k: v.clone() for k, v in tg.items()}
    tg2["labels"][1, 1:] = 2
    tg2["boxes"][1, 1:] = torch.tensor([0.9, 0.9, 0.5, 0.5])
    losses2 = crit(out, tg2)
    for k in losses:
        assert float(losses[k]) == pytest.approx(float(losses2[k]), rel=1e-6), k
    # a batch without any target: only "no object" classification, zero box losses, finite everything
    empty = {"labels": torch.zeros(2, 0, dtype=torch.int64), "boxes": torch.zeros(2, 0, 4),
             "num_targets": torch.zeros(2, dtype=torch.int64)}
    le = crit(out, empty)
    assert float(le["loss_bbox"]) == 0.0 and float(le["loss_giou"]) == 0.0
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.full((12,), 3))
    assert float(le["loss_ce"]) == pytest.approx(float(nll), rel=1e-6)


def test_gradients_flow_and_build_from_config():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "shapes.yaml")
    crit = build_criterion(cfg)
    assert crit.weight_dict["loss_giou_1"] == 2.0 and "loss_ce_2" not in crit.weight_dict
    g = torch.Generator().manual_seed(3)
    logits, pred, tg = _random_problem(g, 2, 10, 4, 4)
    logits.requires_grad_(True)
    pred.requires_grad_(True)
    losses = crit({"pred_logits": logits, "pred_boxes": pred}, tg)
    total = sum(losses[k] * crit.weight_dict[k] for k in losses)
    total.backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(pred.grad).all()
    assert pred.grad.abs().sum() > 0


def test_stacked_layer_outputs_give_the_same_losses_and_gradients():
    """DETR's all_logits / all_boxes (every decoder layer stacked) stand for pred_* + aux_outputs: the same losses
    and gradients as stacking the per-layer entries; a stack that does not match the layers is not used."""
    crit = _criterion(num_classes=3)
    g = torch.Generator().manual_seed(5)
    L, B, Q = 3, 2, 6
    _, _, tg = _random_problem(g, B, Q, 3, 3)
    logits0 = torch.randn(L, B, Q, 4, generator=g)
    boxes0 = torch.cat((torch.rand(L, B, Q, 2, generator=g) * 0.8 + 0.1,
                        torch.rand(L, B, Q, 2, generator=g) * 0.3 + 0.02), -1)

    def run(stacked: bool):
        logits, boxes = logits0.clone().requires_grad_(True), boxes0.clone().requires_grad_(True)
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1],
               "aux_outputs": [{"pred_logits": logits[i], "pred_boxes": boxes[i]} for i in range(L - 1)]}
        if stacked:
            out["all_logits"], out["all_boxes"] = logits, boxes
        losses = crit(out, tg)
        sum(losses.values()).backward()
        return {k: float(v.detach()) for k, v in losses.items()}, logits.grad, boxes.grad

    a, b = run(False), run(True)
    assert a[0] == b[0]
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    # a stack with another number of layers than pred_* + aux_outputs is ignored
    out = {"pred_logits": logits0[-1], "pred_boxes": boxes0[-1], "aux_outputs": [],
           "all_logits": logits0, "all_boxes": boxes0}
    assert set(crit(out, tg)) == {"loss_ce", "loss_bbox", "loss_giou"}


def test_weighted_total_from_the_stacked_losses():
    """SetCriterion's Losses: the weighted total from `stacked` equals the sum over the dict (value and gradients),
    its backward runs no per-loss operators, and a dict a caller changed falls back to the dict's values."""
    from helpers import OpCounter

    from detr_fast.criterion import Losses, weighted_total

    cfg = load_config(None, ["model.dec_layers=4", "model.num_classes=5"])
    crit = build_criterion(cfg)
    g = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    L, B, Q = 4, 3, 9
    _, _, tg = _random_problem(g, B, Q, 4, 5)
    logits0 = torch.randn(L, B, Q, 6, generator=g)
    boxes0 = torch.cat((torch.rand(L, B, Q, 2, generator=g) * 0.8 + 0.1,
                        torch.rand(L, B, Q, 2, generator=g) * 0.3 + 0.02), -1)

    def run(fn):
        logits, boxes = logits0.clone().requires_grad_(), boxes0.clone().requires_grad_()
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "all_logits": logits, "all_boxes": boxes,
               "aux_outputs": [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]}
        losses = crit(out, tg)
        total = fn(losses)
        with OpCounter() as ops:
            total.backward()
        return total.detach(), logits.grad, boxes.grad, ops.ops, losses

    t1, gl1, gb1, ops1, losses = run(lambda ls: sum(ls[k] * crit.weight_dict[k] for k in ls))
    t2, gl2, gb2, ops2, _ = run(lambda ls: weighted_total(ls, crit.weight_dict)[0])
    assert isinstance(losses, Losses) and losses.intact() and len(losses) == 3 * L
    assert losses.stacked_keys[:3] == ["loss_ce_0", "loss_bbox_0", "loss_giou_0"]
    assert losses.stacked_keys[-3:] == ["loss_ce", "loss_bbox", "loss_giou"]
    assert torch.equal(torch.stack([losses[k] for k in losses.stacked_keys]), losses.stacked)
    torch.testing.assert_close(t2, t1, rtol=1e-6, atol=0)
    torch.testing.assert_close(gl2, gl1, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gb2, gb1, rtol=1e-6, atol=1e-9)
    # per-loss products and sums in the dict's backward, one product for the stacked one
    assert ops1["aten.mul"] >= 3 * L and ops2["aten.mul"] <= 3, (ops1, ops2)
    assert sum(ops2.values()) < sum(ops1.values()) - L, (ops1, ops2)
    # keys and weights: the stacked order, a name missing from weight_dict weighs 0
    total, keys, weights, vals = weighted_total(losses, {"loss_ce": 2.0})
    assert keys == losses.stacked_keys and weights.tolist() == [0.0] * (3 * L - 3) + [2.0, 0.0, 0.0]
    torch.testing.assert_close(total, 2.0 * losses["loss_ce"].detach(), rtol=1e-6, atol=0)
    # a changed dict is no longer intact: its own values count, in sorted order unless keys are given
    losses["loss_bbox"] = losses["loss_bbox"] * 0 + 100.0
    assert not losses.intact()
    total, keys, _, vals = weighted_total(losses, {"loss_bbox": 1.0})
    assert keys == sorted(losses) and float(total.detach()) == 100.0
    total, keys, _, _ = weighted_total(losses, {"loss_bbox": 1.0}, keys=losses.stacked_keys)
    assert keys == losses.stacked_keys and float(total.detach()) == 100.0
    losses["extra"] = torch.tensor(1.0)
    assert "extra" in weighted_total(losses, {})[1]
