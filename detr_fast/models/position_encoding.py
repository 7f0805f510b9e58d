"""2-D sine position encoding computed from the padding mask (DETR's normalize=True variant)."""
from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """mask [B, h, w] bool (True = padding) -> pos [B, 2 * num_pos_feats, h, w] float32.

    Row and column indices count only unpadded pixels, are normalized by the image's unpadded extent and scaled to
    [0, 2*pi]; each of the num_pos_feats channels per axis is sin/cos at a frequency temperature^(-2i/num_pos_feats).
    The y channels come first, then x.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi, eps: float = 1e-6):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.eps = eps

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        not_mask = (~mask).to(torch.float32)
        y = not_mask.cumsum(1)  # [B, h, w]
        x = not_mask.cumsum(2)
        if self.normalize:
            y = y / (y[:, -1:, :] + self.eps) * self.scale
            x = x / (x[:, :, -1:] + self.eps) * self.scale
        i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        freq = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.num_pos_feats)
        px = x[..., None] / freq  # [B, h, w, F]
        py = y[..., None] / freq
        px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
        py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)
