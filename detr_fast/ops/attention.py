"""attention (kernels in csrc/attention)."""
from __future__ import annotations

from detr_fast.ops import reference


def attention(q, k, v, key_padding_mask=None, dropout_p=0.0):
    """See reference.attention: q [B, H, Lq, D], k/v [B, H, Lk, D], mask [B, Lk] -> [B, H, Lq, D]."""
    return reference.attention(q, k, v, key_padding_mask, dropout_p)
