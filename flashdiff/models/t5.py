"""T5 / UMT5 encoder (transformers' T5EncoderModel, UMT5EncoderModel) in MLX.

T5-v1.1 (FLUX, HiDream): gated-GELU FFN (``wi_0``/``wi_1``/``wo``), relative position bias only in
block 0 (shared by all blocks), RMS layer norm, no 1/sqrt(d) attention scaling.
UMT5 (Wan): the same with its own relative position bias in every block (``model_type == "umt5"``).

Names mirror the checkpoint keys: ``shared.weight``, ``encoder.embed_tokens.weight`` (tied to
``shared``; often absent; folded into ``shared`` by sanitize),
``encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight``,
``encoder.block.N.layer.0.SelfAttention.relative_attention_bias.weight``,
``encoder.block.N.layer.0.layer_norm.weight``, ``encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight``,
``encoder.block.N.layer.1.layer_norm.weight``, ``encoder.final_layer_norm.weight``.

Call: ``model(input_ids (B, L) int, attention_mask=None (B, L) 1 keep / 0 pad) -> (B, L, d_model)``
(the last hidden state).

Precision: matmuls run in the weights' dtype; the RMS statistics are taken in float32 and the
normalised activations are cast back to the weight dtype before the gain, as transformers does.
bf16 (the engine default) has float32's exponent range, so T5-XXL does not overflow and runs fully in
bf16, matching transformers loaded with ``torch_dtype=bfloat16``. In float16 the XXL activations
overflow; then the residual stream is kept in float32 (each sub-layer still computes in float16 and
its output is added in float32), close to transformers' float16 path that keeps ``wo`` in float32.
"""

import math
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn

from flashdiff.kernels import attention


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    model_type: str = "t5"
    # None: decided by model_type ("umt5" -> every block has its own relative bias).
    bias_in_every_layer: bool | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "T5Config":
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names and v is not None})
        if cfg.bias_in_every_layer is None:
            cfg.bias_in_every_layer = cfg.model_type == "umt5"
        return cfg

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def act_name(self) -> str:
        # transformers maps "gated-gelu" to the tanh approximation ("gelu_new").
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]


_ACTIVATIONS = {
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu": nn.gelu,
    "relu": nn.relu,
    "silu": nn.silu,
}


def relative_position_bucket(rel: mx.array, num_buckets: int, max_distance: int) -> mx.array:
    """Bidirectional T5 bucket of ``rel = key_pos - query_pos`` (int32), as transformers computes it."""
    num_buckets //= 2
    buckets = (rel > 0).astype(mx.int32) * num_buckets
    n = mx.abs(rel)
    max_exact = num_buckets // 2
    nf = mx.maximum(n, 1).astype(mx.float32)  # log(0) is masked out by `where` below
    large = max_exact + (
        mx.log(nf / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(mx.int32)
    large = mx.minimum(large, num_buckets - 1)
    return buckets + mx.where(n < max_exact, n, large)


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias; statistics in float32."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        xf = x.astype(mx.float32)
        y = xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.weight.dtype in (mx.float16, mx.bfloat16):
            y = y.astype(self.weight.dtype)
        return self.weight * y


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.n_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, cfg.num_heads)

    def compute_bias(self, L: int) -> mx.array:
        pos = mx.arange(L, dtype=mx.int32)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).transpose(2, 0, 1)[None]  # (1, H, L, L)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        B, L, _ = x.shape

        def heads(t):
            return t.reshape(B, L, self.n_heads, self.d_kv).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        # T5 adds the position bias (+ padding mask) to unscaled scores. The additive float mask
        # goes through the shared attention entry point.
        o = attention(q, k, v, scale=1.0, mask=bias.astype(q.dtype))
        return self.o(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5DenseReluDense(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        if cfg.act_name not in _ACTIVATIONS:
            raise ValueError(f"T5 feed_forward_proj {cfg.feed_forward_proj!r} is not supported")
        self.act = _ACTIVATIONS[cfg.act_name]
        self.gated = cfg.is_gated
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        w = self.wo.weight.dtype  # a quantized layer stores packed integers: keep the activation dtype then
        return self.wo(h.astype(w) if mx.issubdtype(w, mx.floating) else h)


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseReluDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = [T5LayerSelfAttention(cfg, has_relative_attention_bias), T5LayerFF(cfg)]

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        attn, ff = self.layer
        x = x + attn.SelfAttention(attn.layer_norm(x), bias).astype(x.dtype)
        return x + ff.DenseReluDense(ff.layer_norm(x)).astype(x.dtype)


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        every = bool(cfg.bias_in_every_layer)
        self.block = [T5Block(cfg, every or i == 0) for i in range(cfg.num_layers)]
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5Encoder(nn.Module):
    """T5EncoderModel / UMT5EncoderModel. ``shared`` is the token embedding; the tied copy
    ``encoder.embed_tokens`` is not kept (sanitize folds it into ``shared``), which saves a second
    vocab x d_model table (2 GB in bf16 for UMT5-XXL)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq_len) integers; got shape {input_ids.shape}")
        B, L = input_ids.shape
        x = self.shared(input_ids)
        if x.dtype == mx.float16:
            x = x.astype(mx.float32)  # see module docstring: fp16 residual stream would overflow
        key_mask = None
        if attention_mask is not None:
            if attention_mask.shape != (B, L):
                raise ValueError(
                    f"attention_mask must have the shape of input_ids {(B, L)} (1 = keep, 0 = pad); "
                    f"got {attention_mask.shape}"
                )
            # Additive key mask with the dtype's minimum (finite, so an all-pad row gives a uniform
            # softmax instead of NaN), as transformers' bidirectional mask.
            dt = self.shared.weight.dtype
            neg = mx.array(mx.finfo(dt).min, dt)
            key_mask = mx.where(attention_mask.astype(mx.bool_), mx.array(0, dt), neg)[:, None, None, :]
        bias = None
        for block in self.encoder.block:
            sa = block.layer[0].SelfAttention
            if bias is None or "relative_attention_bias" in sa:
                bias = sa.compute_bias(L)
                if key_mask is not None:
                    bias = bias.astype(key_mask.dtype) + key_mask
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)

    @staticmethod
    def sanitize(weights: dict) -> dict:
        """Folds the tied ``encoder.embed_tokens.weight`` into ``shared.weight`` (either may be
        missing) and drops decoder / lm_head keys so a full T5 checkpoint loads into the encoder."""
        out = {k: v for k, v in weights.items() if not k.startswith(("decoder.", "lm_head."))}
        tied = out.pop("encoder.embed_tokens.weight", None)
        if "shared.weight" not in out:
            if tied is None:
                raise KeyError("T5 checkpoint has neither 'shared.weight' nor 'encoder.embed_tokens.weight'")
            out["shared.weight"] = tied
        return out
