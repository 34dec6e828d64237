"""FLUX.1 transformer (MMDiT double-stream + single-stream blocks), equivalent to diffusers'
`FluxTransformer2DModel` (diffusers/models/transformers/transformer_flux.py).

Parameter names are the diffusers state-dict keys, so a diffusers `transformer/` checkpoint loads
with `model.load_weights(list(model.sanitize(weights).items()))`. BFL single-file
checkpoints (flux1-dev.safetensors) are recognised by `sanitize` and mapped through `bfl.py`.

Layouts: tokens are (B, L, C) packed latents exactly as the diffusers pipeline passes them; q, k, v
are produced as (B, L, H, Dh) and handed to attention as (B, H, L, Dh) views (common.joint_attention).
The joint sequence order is [text, image]. With fused=True (see FUSED_DEFAULT) the q/k/v projections
are fused: `sanitize` concatenates diffusers' to_q/to_k/to_v (etc.) and `to_checkpoint` splits them back.
"""

import re
from dataclasses import dataclass, field, fields
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from ..common import (BlockStream, TextProjection, TimestepEmbedding, compiled_block_fn, fuse_linears, rope_angles,
                      joint_attention, split_linear, timestep_sinusoid)
from .bfl import bfl_to_diffusers, is_bfl_flux

_NORM_EPS = 1e-6  # LayerNorms (no affine) and q/k RMSNorms all use 1e-6 in FLUX

#: Default of FluxTransformer(config, fused=...). fused=True: one Linear per stream for q/k/v (double
#: blocks) and one for q/k/v/MLP-in (single blocks, BFL's `linear1`), so each stream runs one large
#: GEMM; parity-tested like the unfused layout. On since the H200 run of 2026-11-28: the fused q/k/v
#: GEMM took 0.441 ms vs 0.539 ms for three; FLUX-dev bf16 eager 0.291 s vs 0.342 s, compiled 0.183 s
#: vs 0.185 s (benchmarks/README.md). Checkpoints keep diffusers names (sanitize / to_checkpoint).
FUSED_DEFAULT = True


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
    """Projections and q/k norms of diffusers' FluxAttention; the attention itself is `common.joint_attention`.

    fused=True replaces to_q/to_k/to_v by one `to_qkv` and add_*_proj by one `to_added_qkv` (diffusers'
    `fuse_qkv_projections` names); in a single block (dual=False) q/k/v and the block's proj_mlp become
    one `to_qkv_mlp_proj` (BFL's `linear1`, diffusers FLUX.2's name), rows [q, k, v, mlp].
    """

    def __init__(self, dim: int, heads: int, head_dim: int, dual: bool, fused: bool = False, mlp_dim: int = 0):
        super().__init__()
        self.heads, self.head_dim, self.fused = heads, head_dim, fused
        inner = heads * head_dim
        self.norm_q = nn.RMSNorm(head_dim, eps=_NORM_EPS)
        self.norm_k = nn.RMSNorm(head_dim, eps=_NORM_EPS)
        if not fused:
            self.to_q = nn.Linear(dim, inner)
            self.to_k = nn.Linear(dim, inner)
            self.to_v = nn.Linear(dim, inner)
        elif dual:
            self.to_qkv = nn.Linear(dim, 3 * inner)
        else:
            self.to_qkv_mlp_proj = nn.Linear(dim, 3 * inner + mlp_dim)
        if dual:
            self.to_out = [nn.Linear(inner, dim), nn.Identity()]
            self.norm_added_q = nn.RMSNorm(head_dim, eps=_NORM_EPS)
            self.norm_added_k = nn.RMSNorm(head_dim, eps=_NORM_EPS)
            if fused:
                self.to_added_qkv = nn.Linear(dim, 3 * inner)
            else:
                self.add_q_proj = nn.Linear(dim, inner)
                self.add_k_proj = nn.Linear(dim, inner)
                self.add_v_proj = nn.Linear(dim, inner)
            self.to_add_out = nn.Linear(inner, dim)

    def qkv_proj(self, x):
        """(B, L, D) -> (B, L, 3*H*Dh) projections [q | k | v] of the image stream (one GEMM when fused)."""
        if self.fused:
            return self.to_qkv(x)
        return mx.concatenate([self.to_q(x), self.to_k(x), self.to_v(x)], axis=-1)

    def added_qkv_proj(self, c):
        """The text stream's [q | k | v] projections (double blocks)."""
        if self.fused:
            return self.to_added_qkv(c)
        return mx.concatenate([self.add_q_proj(c), self.add_k_proj(c), self.add_v_proj(c)], axis=-1)

    def qkv_mlp_proj(self, x, proj_mlp=None):
        """Single blocks: (B, L, 3*H*Dh + mlp_dim) = [q | k | v | MLP pre-activation]."""
        if self.fused:
            return self.to_qkv_mlp_proj(x)
        return mx.concatenate([self.qkv_proj(x), proj_mlp(x)], axis=-1)


class FluxTransformerBlock(nn.Module):
    """Double-stream block: separate weights for text and image, joint attention over [text, image]."""

    def __init__(self, dim: int, heads: int, head_dim: int, fused: bool = False):
        super().__init__()
        self.norm1 = AdaNormLinear(dim, 6)
        self.norm1_context = AdaNormLinear(dim, 6)
        self.attn = FluxAttention(dim, heads, head_dim, dual=True, fused=fused)
        self.ff = FeedForward(dim)
        self.ff_context = FeedForward(dim)
        self.scale = head_dim**-0.5

    def __call__(self, x, c, cond, cos, sin, head_major_rope=False):
        shift, scale, gate, shift_m, scale_m, gate_m = _split(self.norm1(cond), 6)
        c_shift, c_scale, c_gate, c_shift_m, c_scale_m, c_gate_m = _split(self.norm1_context(cond), 6)

        a = self.attn
        out = joint_attention(
            [(a.added_qkv_proj(_modulate(c, c_shift, c_scale)), a.norm_added_q, a.norm_added_k),
             (a.qkv_proj(_modulate(x, shift, scale)), a.norm_q, a.norm_k)],
            a.heads, a.head_dim, cos, sin, self.scale, head_major_rope=head_major_rope,
        )
        Lc = c.shape[1]
        c_attn, x_attn = out[:, :Lc], out[:, Lc:]

        x = _gated_add(x, gate, self.attn.to_out[0](x_attn))
        x = _gated_add(x, gate_m, self.ff(_modulate(x, shift_m, scale_m)))
        c = _gated_add(c, c_gate, self.attn.to_add_out(c_attn))
        c = _gated_add(c, c_gate_m, self.ff_context(_modulate(c, c_shift_m, c_scale_m)))
        return x, c


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block on the joint [text, image] sequence: parallel attention and MLP."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0, fused: bool = False):
        super().__init__()
        mlp_dim = int(dim * mlp_ratio)
        self.norm = AdaNormLinear(dim, 3)
        if not fused:
            self.proj_mlp = nn.Linear(dim, mlp_dim)
        self.proj_out = nn.Linear(dim + mlp_dim, dim)
        self.attn = FluxAttention(dim, heads, head_dim, dual=False, fused=fused, mlp_dim=mlp_dim)
        self.scale = head_dim**-0.5

    def __call__(self, h, cond, cos, sin, head_major_rope=False):
        shift, scale, gate = _split(self.norm(cond), 3)
        at = self.attn
        t = at.qkv_mlp_proj(_modulate(h, shift, scale), getattr(self, "proj_mlp", None))
        a = joint_attention([(t, at.norm_q, at.norm_k)], at.heads, at.head_dim, cos, sin, self.scale,
                            head_major_rope=head_major_rope)
        m = t[..., 3 * at.heads * at.head_dim :]
        return _gated_add(h, gate, self.proj_out(mx.concatenate([a, _gelu_tanh(m)], axis=-1)))


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
    """FLUX.1 transformer.

    fused (constructor; default FUSED_DEFAULT): fused q/k/v(/MLP-in) projections, see FluxAttention.
    `sanitize` turns diffusers (or BFL) checkpoints into this layout and `to_checkpoint` turns
    parameters back into diffusers names, so saved folders stay diffusers-compatible either way.
    head_major_rope (attribute, default False; read at call/trace time): see common.joint_attention.
    """

    def __init__(self, config: FluxTransformerConfig, fused: bool | None = None):
        super().__init__()
        self.config = config
        self.fused = FUSED_DEFAULT if fused is None else bool(fused)
        self.head_major_rope = False
        self.stream_blocks = False  # see common.BlockStream; the pipelines set it on GPUs
        self.compile_blocks = False  # one mx.compile trace per block type (common.compiled_block_fn)
        self._block_fns = {}
        c = config
        dim = c.inner_dim
        self.time_text_embed = TimeTextEmbed(dim, c.pooled_projection_dim, c.guidance_embeds)
        self.context_embedder = nn.Linear(c.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(c.in_channels, dim)
        self.transformer_blocks = [
            FluxTransformerBlock(dim, c.num_attention_heads, c.attention_head_dim, fused=self.fused)
            for _ in range(c.num_layers)
        ]
        self.single_transformer_blocks = [
            FluxSingleTransformerBlock(dim, c.num_attention_heads, c.attention_head_dim, fused=self.fused)
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
        hm = self.head_major_rope
        stream = BlockStream(self.stream_blocks)
        double, single = self._block_callers(hm)
        for block in self.transformer_blocks:
            x, c = double(block, x, c, cond, cos, sin)
            stream(x, c)

        # Single blocks run on the joint sequence; diffusers re-concatenates and re-splits it in
        # every block, which is the same thing done once here.
        h = mx.concatenate([c, x], axis=1)
        for block in self.single_transformer_blocks:
            h = single(block, h, cond, cos, sin)
            stream(h)
        x = h[:, L_txt:]

        scale, shift = _split(self.norm_out(cond), 2)  # AdaLayerNormContinuous: scale first
        return self.proj_out(_modulate(x, shift, scale))

    def _block_callers(self, hm: bool):
        """(double, single): call a block directly, or through its compiled per-type function."""
        if not self.compile_blocks:
            return (lambda b, *a: b(*a, hm)), (lambda b, *a: b(*a, hm))
        if hm not in self._block_fns:
            d = compiled_block_fn(self.transformer_blocks[0], hm) if self.transformer_blocks else None
            s = compiled_block_fn(self.single_transformer_blocks[0], hm) if self.single_transformer_blocks else None
            self._block_fns[hm] = (d, s)
        d, s = self._block_fns[hm]
        return (lambda b, *a: d(b.parameters(), *a)), (lambda b, *a: s(b.parameters(), *a))

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

    def sanitize(self, weights: dict) -> dict:
        """diffusers keys (or BFL single-file keys, mapped first) -> this model's parameters.

        Unused keys are dropped; q/k/v(/proj_mlp) are concatenated into the fused layers when the
        model is fused, and fused-layout weights are split when it is not. Quantized layers
        (weight/scales/biases) are fused and split along output rows like plain ones.
        """
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
        weights = {k: v for k, v in weights.items() if k.startswith(tops)}
        if not self.fused:
            return self.to_checkpoint(weights)
        for fused, parts in _fusion_groups(weights):
            fuse_linears(weights, fused, parts)
        return weights

    @staticmethod
    def to_checkpoint(weights: dict) -> dict:
        """Parameters (fused or not, quantized or not) -> diffusers key names (fused layers split).

        Sizes come from the weights themselves: the output rows of a layer are the same quantized
        or not (`to_qkv` rows = 3 * inner; `to_qkv_mlp_proj` rows - 3 * dim = MLP width, where dim
        is the row count of the block's proj_out).
        """
        weights = dict(weights)
        for key in [k for k in weights if k.endswith((".attn.to_qkv.weight", ".attn.to_added_qkv.weight"))]:
            fused = key[: -len(".weight")]
            a = fused.rsplit(".", 1)[0] + "."
            names = ("to_q", "to_k", "to_v") if fused.endswith(".to_qkv") else ("add_q_proj", "add_k_proj", "add_v_proj")
            split_linear(weights, fused, [a + n for n in names], [weights[key].shape[0] // 3] * 3)
        for key in [k for k in weights if k.endswith(".attn.to_qkv_mlp_proj.weight")]:
            b = key[: -len("attn.to_qkv_mlp_proj.weight")]
            if b + "proj_out.weight" not in weights:
                raise ValueError(f"{key} needs {b}proj_out.weight to infer the hidden size; the weights are incomplete")
            dim = weights[b + "proj_out.weight"].shape[0]
            parts = [b + "attn.to_q", b + "attn.to_k", b + "attn.to_v", b + "proj_mlp"]
            split_linear(weights, b + "attn.to_qkv_mlp_proj", parts, [dim] * 3 + [weights[key].shape[0] - 3 * dim])
        return weights


def _fusion_groups(weights: dict):
    """(fused name, diffusers layer names) for every block whose unfused q projection is in `weights`."""
    for key in list(weights):
        if m := re.fullmatch(r"(transformer_blocks\.\d+\.attn\.)to_q\.weight", key):
            a = m.group(1)
            yield a + "to_qkv", [a + "to_q", a + "to_k", a + "to_v"]
            yield a + "to_added_qkv", [a + "add_q_proj", a + "add_k_proj", a + "add_v_proj"]
        elif m := re.fullmatch(r"(single_transformer_blocks\.\d+\.)attn\.to_q\.weight", key):
            b = m.group(1)
            yield b + "attn.to_qkv_mlp_proj", [b + "attn.to_q", b + "attn.to_k", b + "attn.to_v", b + "proj_mlp"]


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
