"""Building blocks shared by the diffusion transformers (timestep embeddings, RoPE)."""

import math

import mlx.core as mx
import mlx.nn as nn


def timestep_sinusoid(
    t: mx.array,
    dim: int = 256,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> mx.array:
    """Sinusoidal timestep features (B,) -> (B, dim) in float32, as diffusers' get_timestep_embedding."""
    half = dim // 2
    exponent = -math.log(max_period) * mx.arange(half, dtype=mx.float32) / (half - downscale_freq_shift)
    args = t.astype(mx.float32)[:, None] * mx.exp(exponent)[None, :] * scale
    sin, cos = mx.sin(args), mx.cos(args)
    emb = mx.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = mx.pad(emb, [(0, 0), (0, 1)])
    return emb


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear (diffusers' TimestepEmbedding, names linear_1 / linear_2)."""

    def __init__(self, in_channels: int, dim: int, out_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, out_dim or dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(x)))


class TextProjection(nn.Module):
    """diffusers' PixArtAlphaTextProjection: Linear -> act -> Linear (act "silu" or "gelu_tanh")."""

    def __init__(self, in_features: int, hidden: int, out_features: int | None = None, act: str = "gelu_tanh"):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden)
        self.linear_2 = nn.Linear(hidden, out_features or hidden)
        self.act = nn.silu if act == "silu" else nn.gelu_approx

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(self.act(self.linear_1(x)))


def rope_angles(positions: mx.array, axes_dims, theta: float = 10000.0) -> mx.array:
    """Rotation angles for multi-axis RoPE.

    positions: (L, n_axes) float positions; axes_dims: per-axis head-dim share (each even).
    Returns (L, sum(axes_dims) // 2) angles in float32, axis blocks concatenated in order.
    The reference computes these in float64; positions here are small integers, so float32 angles
    agree to ~1e-7 relative.
    """
    parts = []
    for i, d in enumerate(axes_dims):
        inv = 1.0 / (theta ** (mx.arange(0, d, 2, dtype=mx.float32) / d))
        parts.append(positions[:, i : i + 1].astype(mx.float32) * inv[None, :])
    return mx.concatenate(parts, axis=-1)


def apply_rope_interleaved(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved pairs (2k, 2k+1) of the last axis.

    x: (..., L, D); cos, sin: (L, D/2) broadcastable. Computed in float32, returned in x.dtype.
    """
    shape = x.shape
    xf = x.astype(mx.float32).reshape(*shape[:-1], shape[-1] // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(shape).astype(x.dtype)
