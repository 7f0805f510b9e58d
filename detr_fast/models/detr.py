"""The DETR detector: backbone -> 1x1 input projection -> transformer -> class and box heads."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from detr_fast.models.backbone import Backbone, Joiner
from detr_fast.models.cast import autocast_dtype, cast_targets, flat_cast
from detr_fast.models.fold import (TrunkFold, fold_frozen_bn, fuse_bias_act, fuse_conv_relu, fuse_residual_grad,
                                   pad_stem_channels, stem_space_to_depth)
from detr_fast.models.linear import bias_grad_mm
from detr_fast.models.position_encoding import PositionEmbeddingSine
from detr_fast.models.transformer import Transformer
from detr_fast.ops.pool import MaxPoolNHWC


class MLP(nn.Module):
    """num_layers Linear layers with ReLU between them (keys bbox_embed.layers.{i}.weight)."""

    def __init__(self, in_dim, hidden_dim, out_dim, num_layers):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class DETR(nn.Module):
    def __init__(self, backbone: Joiner, transformer: Transformer, num_classes: int, num_queries: int,
                 aux_loss: bool = True):
        super().__init__()
        d = transformer.d_model
        self.num_queries, self.num_classes, self.aux_loss = num_queries, num_classes, aux_loss
        self.transformer = transformer
        self.class_embed = nn.Linear(d, num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)
        self.query_embed = nn.Embedding(num_queries, d)
        self.input_proj = nn.Conv2d(backbone.num_channels, d, kernel_size=1)
        self.backbone = backbone
        self.channels_last = False
        self.flat_cast_targets = []  # (module, name) pairs cast in one pass under autocast (model.flat_cast)
        self.trunk_fold = None  # TrunkFold of the folded trunk (model.flat_cast with fold_bn)
        self.bias_grad_mm = False  # model.bias_grad_mm: linear bias gradients as matrix products (models/linear.py)

    def use_flat_cast(self, on: bool = True) -> None:
        """model.flat_cast: under autocast, the transformer's, input projection's and heads' matrix weights are cast
        in one kernel per forward (and their gradients in one per backward) instead of one per weight and use
        (detr_fast.models.cast); with a folded trunk (fold_bn), every convolution's folded scale, shift and weight
        are computed in a few passes for the whole trunk (fold.TrunkFold). Bit-identical results."""
        self.flat_cast_targets = cast_targets(
            [self.input_proj, self.transformer, self.class_embed, self.bbox_embed]) if on else []
        # a folded trunk (fold_bn): every convolution's scale, shift and folded weight in a few passes per forward
        trunk = TrunkFold(self.backbone) if on else None
        self.trunk_fold = trunk if trunk is not None and trunk.convs else None

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> dict:
        """images [B, 3, H, W] float, mask [B, H, W] bool (True = padding) ->
        {pred_logits [B, Q, C+1], pred_boxes [B, Q, 4] (cxcywh in [0, 1] of the unpadded image),
         aux_outputs: [{pred_logits, pred_boxes}] for decoder layers 0..L-2, all_logits [L, B, Q, C+1] and
         all_boxes [L, B, Q, 4]: every decoder layer's, the last one last (aux_outputs and all_* with aux_loss)}."""
        if self.channels_last:
            # the layout change and, under autocast, the cast the trunk's first convolution would make of the images
            # anyway, in one pass instead of two (the same values)
            images = images.to(dtype=autocast_dtype(images, images), memory_format=torch.channels_last)
        with self.trunk_fold.applied(images) if self.trunk_fold is not None else nullcontext():
            feat, m, pos = self.backbone(images, mask)
        with flat_cast(self.flat_cast_targets), bias_grad_mm(self.bias_grad_mm):
            hs = self.transformer(self.input_proj(feat), m, self.query_embed.weight, pos)  # [L, B, Q, d]
            logits = self.class_embed(hs)  # [L, B, Q, C+1]
            boxes = self.bbox_embed(hs).sigmoid()  # [L, B, Q, 4]
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
            # every layer at once, for a criterion that scores the layers together (SetCriterion does): the
            # per-layer views above then take no part in the loss, and their backward (a zero-filled [L, ...]
            # gradient and a copy per view, then a sum) does not run
            out["all_logits"], out["all_boxes"] = logits, boxes
        return out


def build_detr(cfg) -> DETR:
    """Build DETR from a Config (detr_fast.config)."""
    m = cfg.model
    train_backbone = cfg.train.lr_backbone > 0
    backbone = Backbone(m.backbone, train_backbone=train_backbone, frozen_bn=m.frozen_bn, weights=m.backbone_weights,
                        light_channels=m.light_channels, light_stem=m.light_stem)
    if m.fold_bn and m.frozen_bn and m.backbone != "light":
        fold_frozen_bn(backbone)
        if m.fused_bias_act:
            fuse_bias_act(backbone)
            if m.conv_fusion:
                fuse_conv_relu(backbone)
            if m.residual_grad_fusion:
                fuse_residual_grad(backbone)
    if m.stem_pad_channels:
        pad_stem_channels(backbone, m.stem_pad_channels)
    if m.stem_space_to_depth:
        stem_space_to_depth(backbone)
    if m.nhwc_pool and m.backbone != "light":
        backbone.body.maxpool = MaxPoolNHWC(backbone.body.maxpool)
    joiner = Joiner(backbone, PositionEmbeddingSine(m.hidden_dim // 2, normalize=True))
    transformer = Transformer(m.hidden_dim, m.nheads, m.enc_layers, m.dec_layers, m.dim_feedforward, m.dropout,
                              attn_impl=m.attention, fused_norm=m.fused_norm, packed_proj=m.packed_proj,
                              fused_ffn=m.fused_ffn)
    model = DETR(joiner, transformer, m.num_classes, m.num_queries, aux_loss=m.aux_loss)
    if m.flat_cast:
        model.use_flat_cast()
    model.bias_grad_mm = m.bias_grad_mm
    if m.channels_last:
        model.channels_last = True
        model.backbone.to(memory_format=torch.channels_last)
    return model
