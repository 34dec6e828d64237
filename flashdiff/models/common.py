"""Building blocks shared by the diffusion transformers (timestep embeddings, RoPE)."""

import math

import mlx.core as mx
import mlx.nn as nn

from ..kernels import attention, qk_norm_rope


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


# ---------------------------------------------------------------------------------------------
# Fused projections and joint attention, shared by the MMDiT transformers (FLUX, Qwen-Image, ...).

_LINEAR_KEYS = ("weight", "scales", "biases", "bias")  # nn.Linear and nn.QuantizedLinear parameter names


def fuse_linears(weights: dict, fused: str, parts) -> dict:
    """Concatenate the Linear layers `parts` (key prefixes) along their output rows into `fused`.

    Exact for plain and quantized layers alike (weight / scales / biases rows are output features).
    Changes `weights` in place and returns it; does nothing if none of the parts is present.
    """
    present = [p for p in parts if f"{p}.weight" in weights]
    if not present:
        return weights
    if len(present) != len(parts):
        missing = [f"{p}.weight" for p in parts if p not in present]
        raise ValueError(f"cannot build the fused layer {fused}: missing {', '.join(missing)}; the checkpoint is incomplete")
    for s in _LINEAR_KEYS:
        have = [f"{p}.{s}" in weights for p in parts]
        if not any(have):
            continue
        if not all(have):
            raise ValueError(
                f"cannot build the fused layer {fused}: only some of {', '.join(parts)} have a `{s}` "
                "(mixing quantized and unquantized, or biased and bias-free layers); re-convert the checkpoint"
            )
        weights[f"{fused}.{s}"] = mx.concatenate([weights.pop(f"{p}.{s}") for p in parts], axis=0)
    return weights


def split_linear(weights: dict, fused: str, parts, sizes) -> dict:
    """Exact inverse of `fuse_linears`: split `fused` into `parts` with `sizes` output rows each."""
    for s in _LINEAR_KEYS:
        w = weights.pop(f"{fused}.{s}", None)
        if w is None:
            continue
        if w.shape[0] != sum(sizes):
            raise ValueError(f"{fused}.{s} has {w.shape[0]} rows, expected {sum(sizes)} = {' + '.join(map(str, sizes))}")
        start = 0
        for p, n in zip(parts, sizes):
            weights[f"{p}.{s}"] = w[start : start + n]
            start += n
    return weights


def joint_attention(sources, heads: int, head_dim: int, cos, sin, scale: float, mask=None,
                    head_major_rope: bool = False):
    """Attention of the MMDiT blocks, from the fused q/k/v projection outputs of each stream.

    sources: [(t, norm_q, norm_k), ...] in joint-sequence order (text first), t (B, L_i, >= 3*H*Dh)
    with columns [q | k | v | anything]; norm_q / norm_k the stream's per-head nn.RMSNorm (one eps for all).
    cos, sin: (L, Dh/2) or (L, 1, Dh/2) for the joint sequence. Returns (B, L, H * Dh).

    q/k RMSNorm, RoPE and the text+image concatenation are one fused kernel on CUDA
    (kernels.qk_norm_rope). Layouts (same numbers):
    - head_major_rope=False (default): q/k/v come out (B, L, H, Dh) and go to attention as they are
      (layout="blhd"): the sm_90 kernel reads and writes that layout; cuDNN gets transposed views (it
      takes strided inputs and allocates its output in q's memory layout). Either way the output is
      (B, L, H, Dh) in memory and the final reshape is free: no copies.
    - head_major_rope=True: q/k/v are made contiguous (B, H, L, Dh) first; the output is then
      head-major and the final transpose + reshape copies it (kept to compare in benchmarks).
    """
    length = sum(t.shape[1] for t, _, _ in sources)
    cos, sin = cos.reshape(length, head_dim // 2), sin.reshape(length, head_dim // 2)
    eps = sources[0][1].eps
    q, k, v = qk_norm_rope([(t, nq.weight, nk.weight) for t, nq, nk in sources], heads, head_dim, cos, sin, eps)
    if head_major_rope:
        q, k, v = (mx.contiguous(a.transpose(0, 2, 1, 3)) for a in (q, k, v))
        out = attention(q, k, v, scale, mask).transpose(0, 2, 1, 3)
    else:
        out = attention(q, k, v, scale, mask, layout="blhd")
    return out.reshape(out.shape[0], length, heads * head_dim)


class BlockStream:
    """Keeps at most two transformer blocks queued on the GPU during an eager forward pass.

    MLX's host thread can queue many blocks ahead of the GPU; with quantized weights each queued
    layer holds a dequantized scratch until the GPU reaches it, so the peak grows towards the bf16
    size. Calling `stream(x, ...)` after each block starts evaluating that block's outputs
    (async) and waits for the previous block's, so the GPU never idles and memory stays bounded.
    Disabled (a no-op) unless `enabled`; must not be used inside mx.compile.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.previous = ()

    def __call__(self, *arrays):
        if not self.enabled:
            return
        mx.async_eval(*arrays)
        if self.previous:
            mx.eval(*self.previous)
        self.previous = arrays


def compiled_block_fn(template: nn.Module, *static):
    """One mx.compile trace that runs any block shaped like `template`, its weights passed as inputs:
    `fn(block.parameters(), *arrays)` == `block(*arrays, *static)`. Lets a forward pass compile each
    block type once (fused elementwise kernels, cached graph) while still evaluating block by block
    (BlockStream), which a whole-model mx.compile cannot do."""

    def apply(params, *arrays):
        saved = template.parameters()
        template.update(params)
        try:
            return template(*arrays, *static)
        finally:
            template.update(saved)

    return mx.compile(apply)
