"""FLUX.1 transformer (MMDiT double-stream + single-stream blocks), equivalent to diffusers'
`FluxTransformer2DModel` (diffusers/models/transformers/transformer_flux.py).

Parameter names are the diffusers state-dict keys, so a diffusers `transformer/` checkpoint loads
with `model.load_weights(list(FluxTransformer.sanitize(weights).items()))`. BFL single-file
checkpoints (flux1-dev.safetensors) are recognised by `sanitize` and mapped through `bfl.py`.

Layouts: tokens are (B, L, C) packed latents exactly as the diffusers pipeline passes them; inside
attention q, k, v are (B, H, L, Dh). The joint sequence order is [text, image].
"""

from dataclasses import dataclass, field, fields
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from ...kernels import attention
from ..common import TextProjection, TimestepEmbedding, rope_angles, timestep_sinusoid
from .bfl import bfl_to_diffusers, is_bfl_flux

_NORM_EPS = 1e-6  # LayerNorms (no affine) and q/k RMSNorms all use 1e-6 in FLUX


@dataclass
class FluxTransformerConfig:
    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple = field(default=(16, 56, 56))

    def __post_init__(self):
        if self.out_channels is None:
            self.out_channels = self.in_channels
        self.axes_dims_rope = tuple(int(a) for a in self.axes_dims_rope)
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} sums to {sum(self.axes_dims_rope)} but "
                f"attention_head_dim is {self.attention_head_dim}; they must be equal."
            )
        if any(a % 2 for a in self.axes_dims_rope):
            raise ValueError(f"every entry of axes_dims_rope must be even, got {self.axes_dims_rope}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: dict) -> "FluxTransformerConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------------------------
# Small fused element-wise helpers. mx.compile fuses each into one kernel when called eagerly;
# inside an outer mx.compile they are simply inlined.


@mx.compile
def _modulate(x, shift, scale):
    """LayerNorm (no affine, eps 1e-6) then x * (1 + scale) + shift; shift/scale (B, 1, D)."""
    return mx.fast.layer_norm(x, None, None, _NORM_EPS) * (1 + scale) + shift


@mx.compile
def _gated_add(x, gate, y):
    return x + gate * y


@partial(mx.compile, shapeless=True)
def _gelu_tanh(x):
    """GELU (tanh approximation) evaluated in float32 like torch does for half types."""
    return nn.gelu_approx(x.astype(mx.float32)).astype(x.dtype)


@mx.compile
def _rope(x, cos, sin):
    """Rotate interleaved pairs; x (B, L, H, Dh), cos/sin (L, 1, Dh/2) float32.

    Same math as common.apply_rope_interleaved (fp32 compute, result in x.dtype), laid out for
    the (B, L, H, Dh) tensors used here so no transpose is needed before the rotation.
    """
    shape = x.shape
    xf = x.astype(mx.float32).reshape(*shape[:-1], shape[-1] // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(shape).astype(x.dtype)


def _split(x, n):
    """(B, n*D) modulation vector -> n arrays of shape (B, 1, D)."""
    return mx.split(x[:, None, :], n, axis=-1)


# ---------------------------------------------------------------------------------------------


class AdaNormLinear(nn.Module):
    """Holds the `linear` of diffusers' AdaLayerNormZero / ZeroSingle / Continuous.

    Called on SiLU(temb), which the model computes once per forward and shares with all blocks.
    """

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.linear = nn.Linear(dim, n * dim)

    def __call__(self, cond: mx.array) -> mx.array:
        return self.linear(cond)


class GELUProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def __call__(self, x):
        return _gelu_tanh(self.proj(x))


class FeedForward(nn.Module):
    """diffusers FeedForward(activation 'gelu-approximate'): net.0.proj -> GELU-tanh -> net.2."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = [GELUProj(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)]

    def __call__(self, x):
        return self.net[2](self.net[0](x))


class FluxAttention(nn.Module):
    """Projections and q/k norms of diffusers' FluxAttention; the attention itself is `_attend`."""

    def __init__(self, dim: int, heads: int, head_dim: int, dual: bool):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm_q = nn.RMSNorm(head_dim, eps=_NORM_EPS)
        self.norm_k = nn.RMSNorm(head_dim, eps=_NORM_EPS)
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        if dual:
            self.to_out = [nn.Linear(inner, dim), nn.Identity()]
            self.norm_added_q = nn.RMSNorm(head_dim, eps=_NORM_EPS)
            self.norm_added_k = nn.RMSNorm(head_dim, eps=_NORM_EPS)
            self.add_q_proj = nn.Linear(dim, inner)
            self.add_k_proj = nn.Linear(dim, inner)
            self.add_v_proj = nn.Linear(dim, inner)
            self.to_add_out = nn.Linear(inner, dim)

    def _heads(self, x):
        B, L, _ = x.shape
        return x.reshape(B, L, self.heads, self.head_dim)

    def qkv(self, x):
        """(B, L, D) -> q, k, v each (B, L, H, Dh), q and k RMS-normed per head."""
        q = self.norm_q(self._heads(self.to_q(x)))
        k = self.norm_k(self._heads(self.to_k(x)))
        return q, k, self._heads(self.to_v(x))

    def added_qkv(self, c):
        q = self.norm_added_q(self._heads(self.add_q_proj(c)))
        k = self.norm_added_k(self._heads(self.add_k_proj(c)))
        return q, k, self._heads(self.add_v_proj(c))


def _attend(q, k, v, cos, sin, scale):
    """RoPE + attention on (B, L, H, Dh) inputs; returns (B, L, H*Dh)."""
    B, L, H, Dh = q.shape
    q = _rope(q, cos, sin).transpose(0, 2, 1, 3)
    k = _rope(k, cos, sin).transpose(0, 2, 1, 3)
    out = attention(q, k, v.transpose(0, 2, 1, 3), scale)
    return out.transpose(0, 2, 1, 3).reshape(B, L, H * Dh)


class FluxTransformerBlock(nn.Module):
    """Double-stream block: separate weights for text and image, joint attention over [text, image]."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaNormLinear(dim, 6)
        self.norm1_context = AdaNormLinear(dim, 6)
        self.attn = FluxAttention(dim, heads, head_dim, dual=True)
        self.ff = FeedForward(dim)
        self.ff_context = FeedForward(dim)
        self.scale = head_dim**-0.5

    def __call__(self, x, c, cond, cos, sin):
        shift, scale, gate, shift_m, scale_m, gate_m = _split(self.norm1(cond), 6)
        c_shift, c_scale, c_gate, c_shift_m, c_scale_m, c_gate_m = _split(self.norm1_context(cond), 6)

        q, k, v = self.attn.qkv(_modulate(x, shift, scale))
        cq, ck, cv = self.attn.added_qkv(_modulate(c, c_shift, c_scale))
        Lc = c.shape[1]
        out = _attend(
            mx.concatenate([cq, q], axis=1),
            mx.concatenate([ck, k], axis=1),
            mx.concatenate([cv, v], axis=1),
            cos,
            sin,
            self.scale,
        )
        c_attn, x_attn = out[:, :Lc], out[:, Lc:]

        x = _gated_add(x, gate, self.attn.to_out[0](x_attn))
        x = _gated_add(x, gate_m, self.ff(_modulate(x, shift_m, scale_m)))
        c = _gated_add(c, c_gate, self.attn.to_add_out(c_attn))
        c = _gated_add(c, c_gate_m, self.ff_context(_modulate(c, c_shift_m, c_scale_m)))
        return x, c


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block on the joint [text, image] sequence: parallel attention and MLP."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm = AdaNormLinear(dim, 3)
        self.proj_mlp = nn.Linear(dim, int(dim * mlp_ratio))
        self.proj_out = nn.Linear(dim + int(dim * mlp_ratio), dim)
        self.attn = FluxAttention(dim, heads, head_dim, dual=False)
        self.scale = head_dim**-0.5

    def __call__(self, h, cond, cos, sin):
        shift, scale, gate = _split(self.norm(cond), 3)
        n = _modulate(h, shift, scale)
        q, k, v = self.attn.qkv(n)
        a = _attend(q, k, v, cos, sin, self.scale)
        m = _gelu_tanh(self.proj_mlp(n))
        return _gated_add(h, gate, self.proj_out(mx.concatenate([a, m], axis=-1)))


class TimeTextEmbed(nn.Module):
    """diffusers CombinedTimestep(Guidance)TextProjEmbeddings."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        if guidance:
            self.guidance_embedder = TimestepEmbedding(256, dim)
        self.text_embedder = TextProjection(pooled_dim, dim, act="silu")

    def __call__(self, timestep, guidance, pooled):
        dt = pooled.dtype
        emb = self.timestep_embedder(timestep_sinusoid(timestep, 256).astype(dt))
        if guidance is not None:
            emb = emb + self.guidance_embedder(timestep_sinusoid(guidance, 256).astype(dt))
        return emb + self.text_embedder(pooled)


class FluxTransformer(nn.Module):
    def __init__(self, config: FluxTransformerConfig):
        super().__init__()
        self.config = config
        c = config
        dim = c.inner_dim
        self.time_text_embed = TimeTextEmbed(dim, c.pooled_projection_dim, c.guidance_embeds)
        self.context_embedder = nn.Linear(c.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(c.in_channels, dim)
        self.transformer_blocks = [
            FluxTransformerBlock(dim, c.num_attention_heads, c.attention_head_dim) for _ in range(c.num_layers)
        ]
        self.single_transformer_blocks = [
            FluxSingleTransformerBlock(dim, c.num_attention_heads, c.attention_head_dim)
            for _ in range(c.num_single_layers)
        ]
        self.norm_out = AdaNormLinear(dim, 2)
        self.proj_out = nn.Linear(dim, c.patch_size * c.patch_size * c.out_channels)

    @property
    def dtype(self) -> mx.Dtype:
        """Compute dtype: that of the weights (the bias stays floating when a layer is quantized)."""
        return self.x_embedder.bias.dtype

    def rotary_embedding(self, txt_ids: mx.array, img_ids: mx.array):
        """cos, sin tables (L_txt + L_img, 1, Dh/2) float32 for the joint [text, image] sequence.

        Depends only on the ids, so a sampler may compute it once and pass it as `rope=` each step.
        """
        txt_ids, img_ids = _ids2d(txt_ids, "txt_ids"), _ids2d(img_ids, "img_ids")
        ang = rope_angles(mx.concatenate([txt_ids, img_ids], axis=0), self.config.axes_dims_rope)
        ang = ang[:, None, :]
        return mx.cos(ang), mx.sin(ang)

    def __call__(
        self,
        hidden_states: mx.array,
        encoder_hidden_states: mx.array,
        pooled_projections: mx.array,
        timestep,
        img_ids: mx.array,
        txt_ids: mx.array,
        guidance=None,
        rope=None,
    ) -> mx.array:
        """hidden_states (B, L_img, in_channels), encoder_hidden_states (B, L_txt, joint_dim),
        pooled_projections (B, pooled_dim), timestep (B,) = sigma (t/1000), img_ids (L_img, 3),
        txt_ids (L_txt, 3), guidance (B,) or None (dev models need it; schnell must not get it).
        Returns (B, L_img, patch_size**2 * out_channels) in the weights' dtype."""
        self._check_inputs(hidden_states, encoder_hidden_states, pooled_projections, guidance)
        B, L_img, _ = hidden_states.shape
        L_txt = encoder_hidden_states.shape[1]
        dt = self.dtype

        # diffusers casts t (and guidance) to the activation dtype before scaling by 1000.
        timestep = _batch_vec(timestep, B, "timestep").astype(dt) * 1000
        if guidance is not None:
            guidance = _batch_vec(guidance, B, "guidance").astype(dt) * 1000
        temb = self.time_text_embed(timestep, guidance, pooled_projections.astype(dt))
        cond = nn.silu(temb)

        if rope is None:
            rope = self.rotary_embedding(txt_ids, img_ids)
        cos, sin = rope
        if cos.shape[0] != L_txt + L_img:
            raise ValueError(
                f"ids give {cos.shape[0]} positions but the sequence has L_txt + L_img = "
                f"{L_txt} + {L_img}; txt_ids must be (L_txt, 3) and img_ids (L_img, 3)."
            )

        x = self.x_embedder(hidden_states.astype(dt))
        c = self.context_embedder(encoder_hidden_states.astype(dt))
        for block in self.transformer_blocks:
            x, c = block(x, c, cond, cos, sin)

        # Single blocks run on the joint sequence; diffusers re-concatenates and re-splits it in
        # every block, which is the same thing done once here.
        h = mx.concatenate([c, x], axis=1)
        for block in self.single_transformer_blocks:
            h = block(h, cond, cos, sin)
        x = h[:, L_txt:]

        scale, shift = _split(self.norm_out(cond), 2)  # AdaLayerNormContinuous: scale first
        return self.proj_out(_modulate(x, shift, scale))

    def _check_inputs(self, x, c, pooled, guidance):
        cfg = self.config
        if x.ndim != 3 or x.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"hidden_states must be packed latents (B, L_img, {cfg.in_channels}), got {tuple(x.shape)}"
            )
        if c.ndim != 3 or c.shape[-1] != cfg.joint_attention_dim or c.shape[0] != x.shape[0]:
            raise ValueError(
                f"encoder_hidden_states must be (B={x.shape[0]}, L_txt, {cfg.joint_attention_dim}), "
                f"got {tuple(c.shape)}"
            )
        if pooled.shape != (x.shape[0], cfg.pooled_projection_dim):
            raise ValueError(
                f"pooled_projections must be (B={x.shape[0]}, {cfg.pooled_projection_dim}), got {tuple(pooled.shape)}"
            )
        if cfg.guidance_embeds and guidance is None:
            raise ValueError("this FLUX model is guidance-distilled (guidance_embeds=True, e.g. dev): pass guidance")
        if not cfg.guidance_embeds and guidance is not None:
            raise ValueError("this FLUX model has no guidance embedding (e.g. schnell): pass guidance=None")

    @staticmethod
    def sanitize(weights: dict) -> dict:
        """diffusers keys pass through; BFL single-file keys are mapped first; unused keys dropped."""
        if is_bfl_flux(weights):
            weights = bfl_to_diffusers(weights)
        tops = (
            "time_text_embed.",
            "context_embedder.",
            "x_embedder.",
            "transformer_blocks.",
            "single_transformer_blocks.",
            "norm_out.",
            "proj_out.",
        )
        return {k: v for k, v in weights.items() if k.startswith(tops)}


def _ids2d(ids, name):
    ids = mx.array(ids) if not isinstance(ids, mx.array) else ids
    if ids.ndim == 3:  # deprecated batched ids in diffusers: the first row is used
        ids = ids[0]
    if ids.ndim != 2:
        raise ValueError(f"{name} must be (L, n_axes), got shape {tuple(ids.shape)}")
    return ids


def _batch_vec(v, B, name):
    v = mx.array(v) if not isinstance(v, mx.array) else v
    if v.ndim == 0:
        v = mx.broadcast_to(v, (B,))
    if v.shape != (B,):
        raise ValueError(f"{name} must be a scalar or shape (B,) = ({B},), got {tuple(v.shape)}")
    return v
