"""Attention entry point used by every model.

q, k, v: (B, H, L, D). mask: optional boolean (True = attend) or additive mask broadcastable to
(B, H, Lq, Lk). Returns (B, H, Lq, D). The custom kernels plug in here.
"""

import mlx.core as mx


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
